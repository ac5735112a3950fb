//! `/sync` and `/messages` over the room timeline: stream positions are the tokens, so nothing
//! is skipped or delivered twice (architecture invariant 3).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use lattice_storage::records::{EventRecord, RoomRecord};
use lattice_storage::{Direction, KeyRange, Table, keys};
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{Map, Value, json};

use super::Rooms;
use super::filter::{EventFilter, SyncFilter};
use super::topological::{HistoryGap, HistoryPage, HistoryToken, TopoPos, history_position};
use super::visibility::{MAX_HIDDEN_RUN, StateView, Viewer};
use crate::ServiceError;

/// Most timeline events one room gets in one sync or one page of `/messages`.
pub const MAX_TIMELINE_LIMIT: usize = 1_000;
const DEFAULT_TIMELINE_LIMIT: usize = 20;
/// Longest a `/sync` long-poll waits.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Most timeline rows one room's page looks at while a filter skips events.
const MAX_FILTERED_SCAN: usize = lattice_storage::MAX_SCAN_ROWS;
/// Members the room summary names.
const MAX_HEROES: usize = 5;
/// Member rows looked at to find them (left and banned members are passed over).
const MAX_HERO_CANDIDATES: usize = 100;

pub struct SyncRequest {
    /// The `next_batch` of an earlier sync; `None` for an initial sync.
    pub since: Option<SyncToken>,
    pub timeout: Duration,
    /// The syncing device, whose to-device inbox the sync delivers and acknowledges.
    pub device_id: Option<String>,
    pub filter: SyncFilter,
    pub full_state: bool,
}

/// A position in each stream `/sync` reads. Each stream has its own positions, so a slow
/// write in one (an event's batch) never holds back what another shows (a receipt, a typing
/// notice, a message to a device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSet {
    pub events: u64,
    pub receipts: u64,
    pub typing: u64,
    pub account_data: u64,
    pub to_device: u64,
}

impl StreamSet {
    /// Every stream at `position`: what a token of the single shared stream meant.
    fn all_at(position: u64) -> Self {
        Self { events: position, receipts: position, typing: position, account_data: position, to_device: position }
    }

    fn fields(&self) -> [u64; 5] {
        [self.events, self.receipts, self.typing, self.account_data, self.to_device]
    }

    /// Whether any stream is past the same stream in `other`.
    fn any_past(&self, other: &StreamSet) -> bool {
        self.fields().iter().zip(other.fields()).any(|(mine, theirs)| *mine > theirs)
    }
}

/// A `/sync` token: how far each stream was delivered. The to-device part can stay behind the
/// stream when the device's inbox held more than one sync delivers.
///
/// Written `m{events}_{receipts}_{typing}_{account_data}_{to_device}`. Tokens of the single
/// shared stream, `s{position}` and `s{position}_{to_device}`, are still read: every stream
/// split off it starts above it. A later multi-writer form will extend each part, not reorder
/// them (docs/client-api.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub streams: StreamSet,
}

impl SyncToken {
    pub fn parse(token: &str) -> Result<Self, ServiceError> {
        let invalid = || ServiceError::InvalidParam(format!("invalid stream token {token:?}"));
        let number = |part: &str| part.parse::<u64>().map_err(|_| invalid());
        if let Some(rest) = token.strip_prefix('m') {
            let parts = rest.split('_').map(number).collect::<Result<Vec<_>, _>>()?;
            let [events, receipts, typing, account_data, to_device] = parts[..] else { return Err(invalid()) };
            return Ok(Self { streams: StreamSet { events, receipts, typing, account_data, to_device } });
        }
        let rest = token.strip_prefix('s').ok_or_else(invalid)?;
        let (position, to_device) = match rest.split_once('_') {
            Some((position, to_device)) => (number(position)?, Some(number(to_device)?)),
            None => (number(rest)?, None),
        };
        if to_device.is_some_and(|delivered| delivered > position) {
            return Err(invalid());
        }
        let mut streams = StreamSet::all_at(position);
        streams.to_device = to_device.unwrap_or(position);
        Ok(Self { streams })
    }

    pub fn render(self) -> String {
        let StreamSet { events, receipts, typing, account_data, to_device } = self.streams;
        format!("m{events}_{receipts}_{typing}_{account_data}_{to_device}")
    }
}

/// The events position of any token this server hands out (`/messages` takes `/sync` tokens).
pub fn parse_token(token: &str) -> Result<u64, ServiceError> {
    SyncToken::parse(token).map(|t| t.streams.events)
}

fn token(position: u64) -> String {
    format!("s{position}")
}

/// What one sync is about, shared by every room it looks at.
#[derive(Clone, Copy)]
pub(super) struct SyncScope<'a> {
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
}

/// One room's timeline page and the state that goes with it.
struct TimelinePage {
    events: Vec<Value>,
    limited: bool,
    first_position: u64,
    /// The oldest event of the page, where `prev_batch` continues into the room's history.
    first_event: Option<String>,
}

impl Rooms {
    /// Each stream's completed mark: every change up to it is visible (typing, kept in memory,
    /// is stamped before its position is published).
    async fn stream_positions(&self) -> Result<StreamSet, ServiceError> {
        Ok(StreamSet {
            events: self.stream.completed().await?,
            receipts: self.receipts_stream.completed().await?,
            typing: self.typing_stream.completed().await?,
            account_data: self.account_data.position().await?,
            to_device: self.to_device.position().await?,
        })
    }

    /// `GET /sync`: rooms the user is in, invited to or has left since `since`, with their new
    /// timeline events, ephemeral events, account data and to-device messages. With nothing
    /// new for the user it waits up to `timeout`, woken only by writes that concern the user;
    /// a wake-up that brings nothing for them goes back to waiting.
    pub async fn sync(&self, user_id: &UserId, request: SyncRequest) -> Result<Value, ServiceError> {
        let Some(since) = request.since else {
            let now = self.stream_positions().await?;
            return self.sync_once(user_id, &request, now).await;
        };
        if since.streams.any_past(&self.stream_positions().await?) {
            return Err(ServiceError::InvalidParam("the since token is from the future".into()));
        }
        if let Some(device) = &request.device_id {
            self.to_device.acknowledge_to_device(user_id, device, since.streams.to_device).await?;
        }
        if request.timeout.is_zero() {
            let now = self.stream_positions().await?;
            return self.sync_once(user_id, &request, now).await;
        }
        let deadline = tokio::time::Instant::now() + request.timeout.min(MAX_SYNC_TIMEOUT);
        // Listening starts before the first look, so a write after that look still wakes it.
        let listener = self.listen_for_sync(user_id).await?;
        loop {
            let now = self.stream_positions().await?;
            let response = self.sync_once(user_id, &request, now).await?;
            if has_news(&response) || tokio::time::timeout_at(deadline, listener.notified()).await.is_err() {
                return Ok(response);
            }
        }
    }

    /// Registers a waiting sync for the user's own news and the rooms they are in, invited to
    /// or knocking on.
    async fn listen_for_sync(&self, user_id: &UserId) -> Result<crate::notifier::Listener, ServiceError> {
        let rooms = self.memberships_of(user_id).await?;
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
            false => self.rooms_active_in(&scope.since, &scope.now).await?,
        };
        let (mut join, mut invite, mut leave, mut knock) = (Map::new(), Map::new(), Map::new(), Map::new());
        for (room_id, membership) in self.memberships_of(user_id).await? {
            let quiet = active.as_ref().is_some_and(|active| !active.contains(room_id.as_str()))
                && !room_data.contains_key(room_id.as_str());
            if quiet
                || !scope.filter.includes_room(room_id.as_str())
                || self.is_forgotten(user_id, &room_id, &membership).await?
            {
                continue;
            }
            let data = room_data.remove(room_id.as_str()).unwrap_or_default();
            match membership.as_str() {
                "join" => {
                    let changed =
                        scope.initial || scope.full_state || self.room_changed(&room_id, scope.since.events).await?;
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
        let to_device_events: Vec<Value> = to_device
            .events
            .into_iter()
            .filter(|e| !ignored.contains(e["sender"].as_str().unwrap_or_default()))
            .collect();
        Ok(json!({
            "next_batch": next_batch.render(),
            "account_data": { "events": global_data },
            "to_device": { "events": to_device_events },
            "rooms": { "join": join, "invite": invite, "leave": leave, "knock": knock },
        }))
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

    async fn memberships_of(&self, user_id: &UserId) -> Result<Vec<(OwnedRoomId, String)>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::Memberships, &KeyRange::prefix(&prefix)).await?;
        rows.into_iter()
            .map(|(key, membership)| {
                let room = OwnedRoomId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                Ok((room, String::from_utf8_lossy(&membership).into_owned()))
            })
            .collect()
    }

    /// A joined room's part of the sync: timeline, state, ephemeral events, account data and
    /// summary; `None` when nothing in it changed. `changed`: the room has events after `since`
    /// (when it has none, its timeline is not read at all).
    async fn joined_room(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
        account_data: Vec<Value>,
        changed: bool,
    ) -> Result<Option<Value>, ServiceError> {
        let ephemeral = self.ephemeral_events(scope, room_id).await?;
        let timeline = if changed { self.room_sync(scope, room_id, (scope.now.events, None)).await? } else { None };
        let room = match timeline {
            Some(room) => room,
            // Only ephemeral or account-data news: the room still appears, with an empty timeline.
            None if !ephemeral.is_empty() || !account_data.is_empty() => json!({
                "timeline": { "events": [], "limited": false, "prev_batch": token(scope.now.events) },
                "state": { "events": [] },
            }),
            None => return Ok(None),
        };
        let mut room = room;
        if !ephemeral.is_empty() {
            room["ephemeral"] = json!({ "events": ephemeral });
        }
        if !account_data.is_empty() {
            room["account_data"] = json!({ "events": account_data });
        }
        let per_thread = scope.filter.room.timeline.unread_thread_notifications;
        self.push.add_unread_counts(scope.user_id, room_id, per_thread, &mut room).await?;
        Ok(Some(room))
    }

    /// A room the user left or was banned from: its timeline up to the leave, once.
    async fn left_room(&self, scope: &SyncScope<'_>, room_id: &RoomId) -> Result<Option<Value>, ServiceError> {
        // Nothing after the user left is theirs to see.
        let (since, now) = (scope.since.events, scope.now.events);
        let left_at = self.membership_position(scope.user_id, room_id).await?.unwrap_or(since).min(now);
        if left_at <= since {
            return Ok(None);
        }
        let Some(membership_id) = self.current_member_event(scope.user_id, room_id).await? else {
            return Ok(None);
        };
        if !self.was_joined_before(scope.user_id, &membership_id).await? {
            // Never a member (a refused invite or knock): the membership change is all there is.
            let event = self.client_event(&membership_id).await?;
            return Ok(Some(json!({
                "timeline": { "events": [event], "limited": false, "prev_batch": token(left_at.saturating_sub(1)) },
                "state": { "events": [] },
            })));
        }
        let Some(leave) = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&membership_id)).await?
        else {
            return Ok(None);
        };
        self.room_sync(scope, room_id, (left_at, Some(leave.value.state_group))).await
    }

    /// Whether the room has events after `since`, from its record alone (one read), so an
    /// incremental sync's cost does not grow with the user's quiet rooms. Rooms stored before
    /// the record kept a position count as changed.
    /// The rooms with events, receipts or typing changes in `(since, now]`; `None` when more
    /// changed than one read of the activity index holds, and every room must be looked at.
    async fn rooms_active_in(
        &self,
        since: &StreamSet,
        now: &StreamSet,
    ) -> Result<Option<HashSet<String>>, ServiceError> {
        let mut active = self.typing_rooms_since(since.typing, now.typing);
        let ranges = [
            (keys::ACTIVITY_EVENTS, since.events, now.events),
            (keys::ACTIVITY_RECEIPTS, since.receipts, now.receipts),
        ];
        for (stream, since, now) in ranges {
            let range = KeyRange::between(
                &keys::room_activity_from(stream, since.saturating_add(1)),
                &keys::room_activity_from(stream, now.saturating_add(1)),
            );
            let limit = lattice_storage::MAX_SCAN_ROWS;
            let rows = self.kv.scan(Table::RoomActivity, &range, Direction::Forward, limit).await?;
            if rows.len() == limit {
                return Ok(None);
            }
            active.extend(rows.iter().filter_map(|(key, _)| keys::room_activity_room(key)).map(str::to_owned));
        }
        Ok(Some(active))
    }

    async fn room_changed(&self, room_id: &RoomId, since: u64) -> Result<bool, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        Ok(room.is_none_or(|room| room.value.last_stream_position == 0 || room.value.last_stream_position > since))
    }

    /// Whether the user joined the room after `since`, from not being joined at `since`.
    async fn newly_joined(&self, user_id: &UserId, room_id: &RoomId, since: u64) -> Result<bool, ServiceError> {
        if self.membership_position(user_id, room_id).await?.is_none_or(|position| position <= since) {
            return Ok(false);
        }
        Ok(!self.was_joined_at(user_id, room_id, since).await?)
    }

    /// Whether the user was joined in the state after the room's last event at or before
    /// `position`.
    async fn was_joined_at(&self, user_id: &UserId, room_id: &RoomId, position: u64) -> Result<bool, ServiceError> {
        let room = room_id.as_str();
        let range = KeyRange::between(&keys::timeline(room, 0), &keys::timeline(room, position.saturating_add(1)));
        let Some((_, event_id)) = self.kv.scan(Table::Timeline, &range, Direction::Backward, 1).await?.pop() else {
            return Ok(false);
        };
        let key = keys::event(&String::from_utf8_lossy(&event_id));
        let Some(record) = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &key).await? else {
            return Ok(false);
        };
        let state = super::state_store::load(self.kv.as_ref(), record.value.state_group).await?;
        let slot = (ruma::events::StateEventType::RoomMember, user_id.to_string());
        let Some(member) = state.get(&slot) else { return Ok(false) };
        Ok(self.client_event(member.as_str()).await?["content"]["membership"] == "join")
    }

    async fn current_member_event(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<String>, ServiceError> {
        let key = keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str());
        Ok(self.kv.get(Table::CurrentState, &key).await?.map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    /// Whether the user was joined just before `membership_id` (their leave or ban) took effect:
    /// the membership in the state after the event it was built on.
    async fn was_joined_before(&self, user_id: &UserId, membership_id: &str) -> Result<bool, ServiceError> {
        Ok(self.membership_before(membership_id, user_id).await?.as_deref() == Some("join"))
    }

    /// Typing and receipts changed in the sync's range, as the filter and ignore list allow.
    async fn ephemeral_events(&self, scope: &SyncScope<'_>, room_id: &RoomId) -> Result<Vec<Value>, ServiceError> {
        let filter = &scope.filter.room.ephemeral;
        let mut ephemeral = Vec::new();
        if filter.allows_type("m.typing")
            && let Some(users) = self.typing_since(room_id, scope.since.typing, scope.now.typing, scope.initial)
        {
            let users: Vec<_> = users.into_iter().filter(|u| !scope.ignored.contains(u.as_str())).collect();
            ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
        }
        if filter.allows_type("m.receipt")
            && let Some(mut receipts) =
                self.receipts_since(scope.user_id, room_id, scope.since.receipts, scope.now.receipts).await?
        {
            drop_ignored_receipts(&mut receipts, scope.ignored);
            ephemeral.push(receipts);
        }
        Ok(ephemeral)
    }

    /// Timeline events in `(since, upto]` as the filter allows, the newest `limit` of them, with
    /// the state the client needs; `None` when there are none and the sync is incremental.
    async fn room_sync(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
        (upto, at_group): (u64, Option<u64>),
    ) -> Result<Option<Value>, ServiceError> {
        let filter = &scope.filter.room.timeline;
        let limit = filter.limit.map_or(DEFAULT_TIMELINE_LIMIT, |l| l as usize).clamp(1, MAX_TIMELINE_LIMIT);
        let viewer = &mut Viewer::lazy(scope.user_id, room_id);
        let page = self.timeline_page(viewer, (scope.since.events, upto), limit, filter, scope.ignored).await?;
        if page.events.is_empty() && !scope.initial && !scope.full_state {
            return Ok(None);
        }
        let whole_state = scope.initial || page.limited || scope.full_state;
        let state = self.state_for(scope, room_id, at_group, &page.events, whole_state).await?;
        let mut room = json!({
            "timeline": { "events": page.events, "limited": page.limited, "prev_batch": self.prev_batch(&page).await? },
            "state": { "events": state },
        });
        let members_changed = room["timeline"]["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["type"] == "m.room.member"));
        // Counts are of the room now, so a room the user left gets none.
        if at_group.is_none() && (whole_state || members_changed) {
            room["summary"] = self.room_summary(scope.user_id, room_id).await?;
        }
        Ok(Some(room))
    }

    /// The token `/messages` continues backward from, before a sync's timeline: just before its
    /// oldest event in the room's topological order (a stream token when it has no events).
    async fn prev_batch(&self, page: &TimelinePage) -> Result<String, ServiceError> {
        let Some(first) = &page.first_event else { return Ok(token(page.first_position.saturating_sub(1))) };
        let record = self.event_record(first).await?;
        Ok(match record.as_ref().map(history_position).transpose()?.flatten() {
            Some(position) => position.before().render(),
            None => token(page.first_position.saturating_sub(1)),
        })
    }

    /// The newest `limit` events in `(from, upto]` that pass `filter` and that the viewer may
    /// see, oldest first.
    async fn timeline_page(
        &self,
        viewer: &mut Viewer,
        (from, upto): (u64, u64),
        limit: usize,
        filter: &EventFilter,
        ignored: &HashSet<String>,
    ) -> Result<TimelinePage, ServiceError> {
        let mut end = upto.saturating_add(1);
        let mut events = Vec::new();
        let mut first_position = upto;
        let mut first_event = None;
        let mut scanned = 0;
        let mut limited = false;
        let mut hidden_run = 0;
        let room_id = viewer.room_id.clone();
        'scan: while scanned < MAX_FILTERED_SCAN {
            let range =
                KeyRange::between(&keys::timeline(room_id.as_str(), from + 1), &keys::timeline(room_id.as_str(), end));
            let rows = self.kv.scan(Table::Timeline, &range, Direction::Backward, limit + 1).await?;
            if rows.is_empty() {
                break;
            }
            scanned += rows.len();
            let exhausted = rows.len() <= limit;
            for (key, event_id) in rows {
                let position = position_of(&key);
                end = position;
                let event_id = String::from_utf8_lossy(&event_id);
                if !self.may_see_at(viewer, &event_id, position).await? {
                    hidden_run += 1;
                    if hidden_run == MAX_HIDDEN_RUN {
                        limited = true;
                        break 'scan;
                    }
                    continue;
                }
                hidden_run = 0;
                let event = self.timeline_event(viewer, &event_id).await?;
                if !visible(&event, filter, ignored) {
                    continue;
                }
                if events.len() == limit {
                    limited = true;
                    break 'scan;
                }
                first_position = position;
                first_event = Some(event_id.into_owned());
                events.push(event);
            }
            if exhausted {
                break;
            }
        }
        events.reverse();
        Ok(TimelinePage { events, limited, first_position, first_event })
    }

    /// The state section: the whole state (less the timeline's own events) when the client
    /// needs a full picture, else nothing; with lazy loading, only the members the timeline's
    /// senders need. The state is the room's current state, or — for a room the user left — the
    /// state as of their leave (`at_group`), so nothing after it leaks.
    async fn state_for(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
        at_group: Option<u64>,
        timeline: &[Value],
        whole_state: bool,
    ) -> Result<Vec<Value>, ServiceError> {
        let lazy = scope.filter.lazy_load_members();
        if !whole_state && !lazy {
            return Ok(Vec::new());
        }
        let in_timeline: HashSet<&str> = timeline.iter().filter_map(|e| e["event_id"].as_str()).collect();
        let mut needed_members: BTreeSet<&str> = timeline.iter().filter_map(|e| e["sender"].as_str()).collect();
        if whole_state {
            // A fresh view always knows the user's own membership.
            needed_members.insert(scope.user_id.as_str());
        }
        let mut state = Vec::new();
        if !whole_state && at_group.is_none() {
            // An incremental lazy sync: a point read per needed member, not the whole state.
            for member in needed_members {
                let key = keys::current_state(room_id.as_str(), "m.room.member", member);
                if let Some(id) = self.kv.get(Table::CurrentState, &key).await? {
                    let id = String::from_utf8_lossy(&id).into_owned();
                    if !in_timeline.contains(id.as_str()) {
                        state.push(self.client_event(&id).await?);
                    }
                }
            }
            return Ok(state);
        }
        let room_state = self.state_entries(room_id, at_group).await?;
        for (kind, key, id) in &room_state {
            let is_member = kind == "m.room.member";
            // Lazy loading sends only the members the timeline needs.
            let wanted = if lazy && is_member { needed_members.contains(key.as_str()) } else { whole_state };
            if !wanted || in_timeline.contains(id.as_str()) {
                continue;
            }
            let event = self.client_event(id).await?;
            if (is_member && lazy) || scope.filter.room.state.allows(&event) {
                state.push(event);
            }
        }
        Ok(state)
    }

    /// `(type, state_key, event ID)` of the room's current state, or of the state group given.
    async fn state_entries(
        &self,
        room_id: &RoomId,
        group: Option<u64>,
    ) -> Result<Vec<(String, String, String)>, ServiceError> {
        if let Some(group) = group {
            let state = super::state_store::load(self.kv.as_ref(), group).await?;
            return Ok(state.into_iter().map(|((kind, key), id)| (kind.to_string(), key, id.to_string())).collect());
        }
        let prefix = keys::room_rows(room_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::CurrentState, &KeyRange::prefix(&prefix)).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, id)| {
                let slot = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let (kind, state_key) = slot.split_once('\0')?;
                Some((kind.to_owned(), state_key.to_owned(), String::from_utf8_lossy(&id).into_owned()))
            })
            .collect())
    }

    /// `summary`: joined and invited counts and up to five other members to name the room by.
    async fn room_summary(&self, user_id: &UserId, room_id: &RoomId) -> Result<Value, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        let Some(counts) = room.and_then(|r| r.value.member_counts) else {
            return self.counted_room_summary(user_id, room_id).await;
        };
        let mut heroes = Vec::new();
        for (member, _) in self.first_member_event_ids(room_id, MAX_HERO_CANDIDATES).await? {
            if heroes.len() == MAX_HEROES {
                break;
            }
            let Ok(member_id) = UserId::parse(member.as_str()) else { continue };
            let membership = self.membership(&member_id, room_id).await?;
            if member != user_id.as_str() && matches!(membership.as_deref(), Some("join" | "invite")) {
                heroes.push(member);
            }
        }
        Ok(
            json!({ "m.heroes": heroes, "m.joined_member_count": counts.joined, "m.invited_member_count": counts.invited }),
        )
    }

    /// The summary of a room stored before member counts were kept: counted from its members.
    async fn counted_room_summary(&self, user_id: &UserId, room_id: &RoomId) -> Result<Value, ServiceError> {
        let (mut joined, mut invited) = (0u64, 0u64);
        let mut heroes = Vec::new();
        for (member, event_id) in self.member_event_ids(room_id).await? {
            let event = self.client_event(&event_id).await?;
            match event["content"]["membership"].as_str() {
                Some("join") => joined += 1,
                Some("invite") => invited += 1,
                _ => continue,
            }
            if member != user_id.as_str() && heroes.len() < MAX_HEROES {
                heroes.push(member);
            }
        }
        Ok(json!({ "m.heroes": heroes, "m.joined_member_count": joined, "m.invited_member_count": invited }))
    }

    /// The stream position of the user's current membership event in the room.
    async fn membership_position(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<u64>, ServiceError> {
        let Some(id) = self
            .kv
            .get(Table::CurrentState, &keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str()))
            .await?
        else {
            return Ok(None);
        };
        let record =
            lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&String::from_utf8_lossy(&id))).await?;
        Ok(record.and_then(|r| r.value.stream_position))
    }

    /// An invite with the stripped state the spec suggests, when it is new since `since` and
    /// its sender is not ignored.
    pub(super) async fn invited_room_sync(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
    ) -> Result<Option<Value>, ServiceError> {
        let user_id = scope.user_id;
        let Some(invite_id) = self
            .kv
            .get(Table::CurrentState, &keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str()))
            .await?
        else {
            return Ok(None);
        };
        let invite_id = String::from_utf8_lossy(&invite_id).into_owned();
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&invite_id)).await?;
        if record.and_then(|r| r.value.stream_position).is_none_or(|position| position <= scope.since.events) {
            return Ok(None);
        }
        let mut stripped = Vec::new();
        for (kind, key) in [
            ("m.room.create", ""),
            ("m.room.join_rules", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.encryption", ""),
            ("m.room.member", user_id.as_str()),
        ] {
            if let Some(id) =
                self.kv.get(Table::CurrentState, &keys::current_state(room_id.as_str(), kind, key)).await?
            {
                let event = self.client_event(&String::from_utf8_lossy(&id)).await?;
                if kind == "m.room.member" && scope.ignored.contains(event["sender"].as_str().unwrap_or_default()) {
                    return Ok(None);
                }
                stripped.push(json!({ "type": event["type"], "state_key": event["state_key"], "content": event["content"], "sender": event["sender"] }));
            }
        }
        Ok(Some(json!({ "invite_state": { "events": stripped } })))
    }

    /// `GET /rooms/{roomId}/messages`: a page of the room's history in topological order,
    /// before (`backward`) or after `from`, not past `to`, as `filter` allows; with lazy
    /// loading, the senders' member events in `state`. A backward page stops at the first event
    /// that cites a prev event recorded as missing, and says so in [`HistoryPage::gap`].
    pub async fn messages(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        (from, to): (Option<HistoryToken>, Option<HistoryToken>),
        backward: bool,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<HistoryPage, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        let limit = limit.clamp(1, MAX_TIMELINE_LIMIT);
        let from = match from {
            Some(token) => self.history_point(room_id, token).await?,
            None if backward => self.history_end(room_id).await?,
            None => TopoPos::START,
        };
        let to = match to {
            Some(token) => Some(self.history_point(room_id, token).await?),
            None => None,
        };
        let ignored = self.account_data.ignored_users(user_id).await?;
        let gaps_possible = backward && self.room_has_gaps(room_id).await?;
        // Tokens name the last position a client has seen: backward pages hold positions ≤ from,
        // forward pages positions > from.
        let mut cursor = from;
        let mut chunk = Vec::with_capacity(limit);
        let mut gap = None;
        let mut scanned = 0;
        let mut hidden_run = 0;
        let mut exhausted = false;
        while chunk.len() < limit
            && scanned < MAX_FILTERED_SCAN
            && hidden_run < MAX_HIDDEN_RUN
            && !exhausted
            && gap.is_none()
        {
            let (bounds, direction) = if backward {
                ((to, Some(cursor)), Direction::Backward)
            } else {
                ((Some(cursor), to), Direction::Forward)
            };
            let want = limit - chunk.len();
            let rows = self.history_rows(room_id, bounds, direction, want).await?;
            exhausted = rows.len() < want;
            scanned += rows.len();
            for (position, event_id) in rows {
                cursor = if backward { position.before() } else { position };
                match self.history_event(viewer, &event_id).await? {
                    Some(event) => {
                        hidden_run = 0;
                        if visible(&event, filter, &ignored) {
                            chunk.push(event);
                        }
                    }
                    None => hidden_run += 1,
                }
                if gaps_possible {
                    let missing = self.missing_prevs(room_id, &event_id).await?;
                    if !missing.is_empty() {
                        gap = Some(HistoryGap { missing, token: cursor.render() });
                        break;
                    }
                }
            }
        }
        let mut page = json!({ "chunk": chunk, "start": from.render() });
        if !exhausted || gap.is_some() {
            page["end"] = json!(cursor.render());
        }
        if filter.lazy_load_members {
            let at = self.state_view(viewer).await?;
            page["state"] = json!(self.members_of_senders(room_id, at, &chunk).await?);
        }
        Ok(HistoryPage { response: page, gap })
    }

    /// The member events of the senders of `events` in the state the reader may read (the
    /// current state, or the state at their leave), for lazy-loading clients.
    pub(crate) async fn members_of_senders(
        &self,
        room_id: &RoomId,
        at: StateView,
        events: &[Value],
    ) -> Result<Vec<Value>, ServiceError> {
        let senders: BTreeSet<&str> = events.iter().filter_map(|e| e["sender"].as_str()).collect();
        let mut members = Vec::with_capacity(senders.len());
        for sender in senders {
            let id = match at {
                StateView::Current => {
                    let key = keys::current_state(room_id.as_str(), "m.room.member", sender);
                    self.kv.get(Table::CurrentState, &key).await?.map(|id| String::from_utf8_lossy(&id).into_owned())
                }
                StateView::AtGroup(group) => {
                    let slots = [("m.room.member", sender)];
                    super::state_store::lookup(self.kv.as_ref(), group, &slots).await?.pop().flatten()
                }
            };
            if let Some(id) = id {
                members.push(self.client_event(&id).await?);
            }
        }
        Ok(members)
    }
}

/// Whether a timeline event reaches the client: it passes the filter, and it is not a message
/// from an ignored user (their state events still shape the room, so those stay).
fn visible(event: &Value, filter: &EventFilter, ignored: &HashSet<String>) -> bool {
    let ignored_sender =
        ignored.contains(event["sender"].as_str().unwrap_or_default()) && event.get("state_key").is_none();
    !ignored_sender && filter.allows(event)
}

/// Removes ignored users' receipts from an `m.receipt` event.
fn drop_ignored_receipts(receipts: &mut Value, ignored: &HashSet<String>) {
    if ignored.is_empty() {
        return;
    }
    if let Some(by_event) = receipts["content"].as_object_mut() {
        for by_type in by_event.values_mut().filter_map(Value::as_object_mut) {
            for users in by_type.values_mut().filter_map(Value::as_object_mut) {
                users.retain(|user, _| !ignored.contains(user));
            }
        }
    }
}

/// The stream position that ends a timeline (or relation, or thread-activity) key.
pub(super) fn position_of(timeline_key: &[u8]) -> u64 {
    keys::trailing_position(timeline_key).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_tokens_round_trip() {
        let streams =
            StreamSet { events: 7, receipts: 1_000_003, typing: 1_000_001, account_data: 2_000_005, to_device: 9 };
        let token = SyncToken { streams };
        assert_eq!(token.render(), "m7_1000003_1000001_2000005_9");
        assert_eq!(SyncToken::parse(&token.render()).expect("valid"), token);
        // Tokens of the single shared stream mean every stream at that position.
        let shared =
            |position, to_device| SyncToken { streams: StreamSet { to_device, ..StreamSet::all_at(position) } };
        for (text, token) in [("s0", shared(0, 0)), ("s42", shared(42, 42)), ("s42_40", shared(42, 40))] {
            assert_eq!(SyncToken::parse(text).expect("valid"), token, "{text}");
        }
        assert_eq!(parse_token("m7_1_2_3_4").expect("valid"), 7, "/messages reads the events stream");
        for bad in [
            "",
            "s",
            "42",
            "s-1",
            "sx",
            "s4_",
            "s4_5",
            "s4_x",
            "t4",
            "m",
            "m1_2_3_4",
            "m1_2_3_4_5_6",
            "m1__3_4_5",
            "m1_2_3_4_x",
        ] {
            assert!(SyncToken::parse(bad).is_err(), "{bad}");
        }
    }
}
