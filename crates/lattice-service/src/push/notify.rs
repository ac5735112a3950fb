//! What push rules decide for each new event. Ingest hands every live event to
//! [`Push::notifications_into`] with the room's facts (member count, power levels), its current
//! state group and its local joined members; the members are sorted into those who share one
//! evaluation and those evaluated on their own (`audience.rs`), each by ruma's evaluator.
//!
//! Rows, all in the event's own batch: an event that notifies anyone has one `push_events` row
//! (`position` → room, event, thread, time, and the shared actions). When the shared evaluation
//! notifies, one `push_room_notifications` row (`room·position` → highlight flag, sender,
//! thread) stands for every local joined member but the sender who has no row of their own; a
//! member evaluated on their own whose outcome differs gets their own rows: `push_notifications`
//! (`user·position` → their actions, `[]` when the shared row does not apply to them) and
//! `push_unread` (`user·room·position` → a flag byte and the thread). So a message into a room
//! of 10,000 members writes a few rows, not 20,000. A local member's join sets their read
//! marker there (nothing before it is theirs to count) and when they joined (`/notifications`
//! lists nothing of the room from before).
//!
//! Receipts move read markers (`push_read_markers`, `user·room·thread`); the counts in `/sync`
//! are the member's own rows and the room's shared rows after the markers, two short range reads
//! per room. Nothing is re-scanned and no counter is read-modified-written, so events and
//! receipts never conflict with each other.

use std::collections::{BTreeMap, HashMap};

use lattice_storage::records::PushEventRecord;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::push::{Action, FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset};
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UInt, UserId};
use serde_json::value::RawValue;

use super::Push;
use crate::ServiceError;

/// At most this many unread notifications are counted per room (clients show "99+" long
/// before), so reading the counts of a room is one bounded range.
pub const MAX_COUNTED_UNREAD: usize = 1_000;
/// The badge of a push counts at most this many rooms.
pub const MAX_BADGE_ROOMS: usize = 1_000;
/// `/notifications` pages hold at most this many.
pub const MAX_NOTIFICATIONS_LIMIT: usize = 100;
const DEFAULT_NOTIFICATIONS_LIMIT: usize = 20;
/// A `/notifications` page reads at most this many pages of a room's shared rows: a busy room's
/// highlights further back than that are not looked for by `only=highlight`.
const MAX_SHARED_PAGES: usize = 10;
/// Read-marker key of the unthreaded receipt; threaded receipts use `main` or the thread root.
const UNTHREADED: &str = "";
const MAIN_THREAD: &str = "main";
/// Not a read marker but under the same key: where the user's current join is. No thread is
/// named so (thread roots are event IDs, `$…`); a receipt naming it moves nothing.
const JOINED: &str = "#joined";

/// A live event, as push rules see it.
pub struct PushedEvent<'a> {
    pub room_id: &'a RoomId,
    pub event_id: &'a str,
    /// The event's stream position: the order of notifications and what receipts compare with.
    pub position: u64,
    pub ts: u64,
    /// The event as its PDU JSON (the rules match on `type`, `content.*`, `sender`, …).
    pub json: &'a RawValue,
    /// The thread root, for an event in a thread.
    pub thread: Option<String>,
    /// Joined members of the room now.
    pub member_count: u64,
    pub power_levels: Option<PushConditionPowerLevelsCtx>,
}

/// A local joined member who may be notified, with their display name in the room.
#[derive(Clone)]
pub struct Recipient {
    pub user_id: OwnedUserId,
    pub display_name: String,
}

/// A `push_unread` value: one byte (0: notifies, 1: notifies and highlights, 2: does not
/// notify although the room's shared row does), then the thread root of an event in a thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct UnreadRow {
    pub thread: Option<String>,
    pub highlight: bool,
    /// The member is left out of the event's shared row.
    pub suppressed: bool,
}

impl UnreadRow {
    pub fn encode(&self) -> Vec<u8> {
        let thread = self.thread.as_deref().unwrap_or_default();
        let mut value = Vec::with_capacity(1 + thread.len());
        value.push(match (self.suppressed, self.highlight) {
            (true, _) => 2,
            (false, highlight) => u8::from(highlight),
        });
        value.extend_from_slice(thread.as_bytes());
        value
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let (&flag, thread) = value.split_first()?;
        let (highlight, suppressed) = match flag {
            0 => (false, false),
            1 => (true, false),
            2 => (false, true),
            _ => return None,
        };
        let thread = match thread {
            [] => None,
            root => Some(String::from_utf8(root.to_vec()).ok()?),
        };
        Some(UnreadRow { thread, highlight, suppressed })
    }
}

/// A `push_room_notifications` value: one byte (1: highlights), the sender (whom it never
/// notifies), `\0`, then the thread root of an event in a thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SharedRow {
    pub highlight: bool,
    pub sender: String,
    pub thread: Option<String>,
}

impl SharedRow {
    pub fn encode(&self) -> Vec<u8> {
        let thread = self.thread.as_deref().unwrap_or_default();
        let mut value = Vec::with_capacity(2 + self.sender.len() + thread.len());
        value.push(u8::from(self.highlight));
        value.extend_from_slice(self.sender.as_bytes());
        value.push(0);
        value.extend_from_slice(thread.as_bytes());
        value
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let (&flag, rest) = value.split_first()?;
        let highlight = match flag {
            0 => false,
            1 => true,
            _ => return None,
        };
        let end = rest.iter().position(|&byte| byte == 0)?;
        let sender = String::from_utf8(rest[..end].to_vec()).ok()?;
        let thread = match &rest[end + 1..] {
            [] => None,
            root => Some(String::from_utf8(root.to_vec()).ok()?),
        };
        Some(SharedRow { highlight, sender, thread })
    }
}

/// A `push_notifications` value: the actions of the recipient's rule, as JSON.
pub(super) fn encode_actions_json(actions: &serde_json::Value) -> Vec<u8> {
    actions.to_string().into_bytes()
}

fn actions_json(actions: &[Action]) -> Result<Vec<u8>, ServiceError> {
    serde_json::to_vec(actions).map_err(internal)
}

fn internal(error: serde_json::Error) -> ServiceError {
    ServiceError::Internal(error.to_string())
}

/// Notification and highlight counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    pub notifications: u64,
    pub highlights: u64,
}

impl UnreadCounts {
    fn add(&mut self, highlight: bool) {
        self.notifications += 1;
        self.highlights += u64::from(highlight);
    }
}

/// A room's unread counts for one user: the whole room, the main timeline, and each thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomCounts {
    pub room: UnreadCounts,
    pub main: UnreadCounts,
    pub threads: BTreeMap<String, UnreadCounts>,
}

/// One entry of `/notifications`.
#[derive(Clone, Debug)]
pub struct Notification {
    pub room_id: OwnedRoomId,
    pub event_id: String,
    pub actions: Vec<Action>,
    pub read: bool,
    pub ts: u64,
}

pub struct NotificationsPage {
    pub notifications: Vec<Notification>,
    /// Where the next (older) page starts, when there may be one.
    pub next_token: Option<String>,
}

/// The counts of `rows` (a room's notifying events after its unthreaded marker) that the read
/// markers leave unread.
fn counted(rows: &[(u64, UnreadRow)], markers: &HashMap<String, u64>) -> RoomCounts {
    let mut counts = RoomCounts::default();
    for (position, unread) in rows {
        let read = |thread: &str| markers.get(thread).is_some_and(|&read| *position <= read);
        if read(UNTHREADED) || read(unread.thread.as_deref().unwrap_or(MAIN_THREAD)) {
            continue;
        }
        counts.room.add(unread.highlight);
        match &unread.thread {
            Some(root) => counts.threads.entry(root.clone()).or_default().add(unread.highlight),
            None => counts.main.add(unread.highlight),
        }
    }
    counts
}

/// The actions of the first enabled rule of `rules` that applies (the spec's order: override,
/// content, room, sender, underride), as ruma's `Ruleset::get_actions` but over an event
/// flattened once for every recipient.
async fn matching_actions<'a>(
    rules: &'a Ruleset,
    event: &FlattenedJson,
    context: &PushConditionRoomCtx,
) -> &'a [Action] {
    for rule in rules {
        if rule.applies(event, context).await {
            return rule.actions();
        }
    }
    &[]
}

impl Push {
    /// Evaluates a new event for the room's local members and adds the notifications (and the
    /// pushes they queue) to `batch`, the event's own, so an event and what it notified are
    /// stored together. Members who share an evaluation (`audience.rs`) cost one evaluation and
    /// one shared row between them; each member evaluated on their own costs their evaluation
    /// and, when their outcome differs from the shared one, two rows. Returns whether a push
    /// was queued: then call [`Push::wake_delivery`] once the batch is written.
    pub(crate) async fn notifications_into(
        &self,
        event: &PushedEvent<'_>,
        state_group: u64,
        recipients: &[Recipient],
        into: &mut WriteBatch,
    ) -> Result<bool, ServiceError> {
        let raw: Raw<ruma::events::AnySyncTimelineEvent> = Raw::from_json(event.json.to_owned());
        let flattened = FlattenedJson::from_raw(&raw);
        let object: serde_json::Value = serde_json::from_str(event.json.get()).unwrap_or_default();
        let sender = object["sender"].as_str().unwrap_or_default();
        let audience = self.audience(event.room_id, state_group, recipients).await?;
        let named = audience.named_by(&object);
        let mut context = PushConditionRoomCtx::new(
            event.room_id.to_owned(),
            UInt::new_saturating(event.member_count),
            // Replaced by each recipient's below.
            ruma::owned_user_id!("@recipient:invalid"),
            String::new(),
        );
        if let Some(levels) = &event.power_levels {
            context = context.with_power_levels(levels.clone());
        }
        // The shared outcome is that of any member the event does not name.
        let sharing = audience
            .recipients
            .iter()
            .enumerate()
            .find(|(index, recipient)| !named.contains(index) && recipient.user_id.as_str() != sender);
        let shared = match sharing {
            Some((_, recipient)) => Some(self.actions_for(recipient, &flattened, &mut context).await?),
            None => None,
        };
        let shared = shared.filter(|actions| actions.iter().any(Action::should_notify));
        let shared_json = shared.as_deref().map(actions_json).transpose()?;
        let mut batch = WriteBatch::new();
        let mut own_notifications = 0;
        let mut queued = false;
        for index in named {
            let recipient = &audience.recipients[index];
            // The spec's first rule of evaluation: one's own events never notify.
            if recipient.user_id.as_str() == sender {
                continue;
            }
            // Nor do the events of a sender the recipient ignores (`m.ignored_user_list`): their
            // clients never see them, so nothing may count, list or push them.
            let ignored = self.account_data.ignored_users(&recipient.user_id).await?.contains(sender);
            let actions = match ignored {
                true => Vec::new(),
                false => self.actions_for(recipient, &flattened, &mut context).await?,
            };
            let notifies = actions.iter().any(Action::should_notify);
            if notifies {
                queued |= self.queue_pushes(&mut batch, &recipient.user_id, event, &actions, &object).await?;
            }
            let own = actions_json(&actions)?;
            if shared_json.as_ref() == Some(&own) || (!notifies && shared.is_none()) {
                // The shared row, or the lack of one, says it already.
                continue;
            }
            let user = recipient.user_id.as_str();
            let unread = UnreadRow {
                thread: event.thread.clone(),
                highlight: actions.iter().any(Action::is_highlight),
                suppressed: !notifies,
            };
            batch.put(Table::PushNotifications, keys::push_notification(user, event.position), own);
            batch.put(
                Table::PushUnread,
                keys::push_unread(user, event.room_id.as_str(), event.position),
                unread.encode(),
            );
            own_notifications += usize::from(notifies);
        }
        if let Some(actions) = &shared {
            let row = SharedRow {
                highlight: actions.iter().any(Action::is_highlight),
                sender: sender.to_owned(),
                thread: event.thread.clone(),
            };
            batch.put(
                Table::PushRoomNotifications,
                keys::push_room_notification(event.room_id.as_str(), event.position),
                row.encode(),
            );
        }
        if shared.is_some() || own_notifications > 0 {
            let record = PushEventRecord {
                room_id: event.room_id.to_string(),
                event_id: event.event_id.to_owned(),
                thread: event.thread.clone(),
                ts: event.ts,
                actions: shared.as_deref().map(serde_json::to_value).transpose().map_err(internal)?,
            };
            lattice_storage::put(&mut batch, keys::push_event(event.position), &record);
        }
        // Only this service's own tables, though the event's batch carries them.
        super::TABLES.check_batch(&batch)?;
        into.ops.extend(batch.ops);
        into.conditions.extend(batch.conditions);
        Ok(queued)
    }

    /// The actions of the recipient's rules for the event; `context` is reused across
    /// recipients, only its user and display name changing.
    async fn actions_for(
        &self,
        recipient: &Recipient,
        event: &FlattenedJson,
        context: &mut PushConditionRoomCtx,
    ) -> Result<Vec<Action>, ServiceError> {
        let rules = self.cached_rules(&recipient.user_id).await?;
        context.user_id.clone_from(&recipient.user_id);
        context.user_display_name.clone_from(&recipient.display_name);
        Ok(matching_actions(&rules.ruleset, event, context).await.to_vec())
    }

    /// Wakes the delivery task after a batch with queued pushes was written.
    pub(crate) fn wake_delivery(&self) {
        self.queued.notify_one();
    }

    /// A receipt of the user at the event at `position`: moves the read marker of its thread
    /// (`None`: the unthreaded receipt, which reads the whole room) forward, never back, and
    /// drops the unread rows an unthreaded receipt has read. When it read a notifying event and
    /// the user has pushers, each pusher gets a counts-only push (the push gateway API's badge
    /// update) in the same batch, so a phone's badge falls when the user reads elsewhere.
    pub(crate) async fn mark_read(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        thread: Option<&str>,
        position: u64,
    ) -> Result<(), ServiceError> {
        let (user, room) = (user_id.as_str(), room_id.as_str());
        let thread_key = thread.unwrap_or(UNTHREADED);
        if thread_key == JOINED {
            return Ok(());
        }
        let key = keys::push_read_marker(user, room, thread_key);
        let stored = self.kv.get(Table::PushReadMarkers, &key).await?;
        if stored.as_deref().and_then(keys::stored_position).is_some_and(|stored| stored >= position) {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.put(Table::PushReadMarkers, key, position.to_be_bytes().to_vec());
        if thread.is_none() {
            let range = KeyRange::between(
                &keys::push_unread(user, room, 0),
                &keys::push_unread(user, room, position.saturating_add(1)),
            );
            for (read, _) in self.kv.scan(Table::PushUnread, &range, Direction::Forward, MAX_COUNTED_UNREAD).await? {
                batch.delete(Table::PushUnread, read);
            }
        }
        let badge_queued = self.has_pushers(user_id).await?
            && self.reads_a_notification(user_id, room_id, thread_key, position).await?
            && self.queue_badge_updates(&mut batch, user_id, position).await?;
        self.kv.write(batch).await?;
        if badge_queued {
            self.wake_delivery();
        }
        Ok(())
    }

    /// Whether moving the read marker of `thread_key` to `position` lowers the room's count.
    async fn reads_a_notification(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        thread_key: &str,
        position: u64,
    ) -> Result<bool, ServiceError> {
        let mut markers = self.read_markers(user_id, room_id).await?;
        let rows = self.unread_rows(user_id, room_id, &markers).await?;
        let before = counted(&rows, &markers).room.notifications;
        markers.insert(thread_key.to_owned(), position);
        Ok(counted(&rows, &markers).room.notifications < before)
    }

    /// The user left the room (or was kicked or banned) with the event at `position`: all they
    /// had unread there is read, in the leave's own batch, so a room they are no longer in
    /// never counts in the badge of their pushes. A rejoin notifies after the leave.
    pub(crate) async fn left_room_into(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        position: u64,
        into: &mut WriteBatch,
    ) -> Result<(), ServiceError> {
        let (user, room) = (user_id.as_str(), room_id.as_str());
        let mut batch = WriteBatch::new();
        batch.put(
            Table::PushReadMarkers,
            keys::push_read_marker(user, room, UNTHREADED),
            position.to_be_bytes().to_vec(),
        );
        batch.delete(Table::PushReadMarkers, keys::push_read_marker(user, room, JOINED));
        let range = KeyRange::prefix(&keys::push_room_rows(user, room));
        for (read, _) in self.kv.scan(Table::PushUnread, &range, Direction::Forward, MAX_COUNTED_UNREAD).await? {
            batch.delete(Table::PushUnread, read);
        }
        super::TABLES.check_batch(&batch)?;
        into.ops.extend(batch.ops);
        Ok(())
    }

    /// The user joined the room (from any other membership) with the event at `position`, in
    /// the join's own batch: nothing before it counts for them (the room's shared rows stand for
    /// its members at each event), and `/notifications` lists nothing of the room from before.
    pub(crate) fn joined_room_into(&self, user_id: &UserId, room_id: &RoomId, position: u64, into: &mut WriteBatch) {
        let (user, room) = (user_id.as_str(), room_id.as_str());
        for marker in [UNTHREADED, JOINED] {
            into.put(
                Table::PushReadMarkers,
                keys::push_read_marker(user, room, marker),
                position.to_be_bytes().to_vec(),
            );
        }
    }

    /// The user's read markers in the room, by thread key.
    async fn read_markers(&self, user_id: &UserId, room_id: &RoomId) -> Result<HashMap<String, u64>, ServiceError> {
        let prefix = keys::push_room_rows(user_id.as_str(), room_id.as_str());
        let rows = self.kv.scan(Table::PushReadMarkers, &KeyRange::prefix(&prefix), Direction::Forward, 1_000).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, value)| {
                let thread = String::from_utf8_lossy(key.get(prefix.len()..)?).into_owned();
                Some((thread, keys::stored_position(&value)?))
            })
            .collect())
    }

    /// The user's unread counts in the room: notifying events after the read markers (the
    /// unthreaded one, and the event's own thread's), at most [`MAX_COUNTED_UNREAD`].
    pub async fn room_counts(&self, user_id: &UserId, room_id: &RoomId) -> Result<RoomCounts, ServiceError> {
        let markers = self.read_markers(user_id, room_id).await?;
        let rows = self.unread_rows(user_id, room_id, &markers).await?;
        Ok(counted(&rows, &markers))
    }

    /// The user's notifying events in the room after the unthreaded read marker, by position:
    /// their own rows, and the room's shared rows but theirs (as sender) and those their own
    /// rows decide; the newest [`MAX_COUNTED_UNREAD`] of each.
    async fn unread_rows(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        markers: &HashMap<String, u64>,
    ) -> Result<Vec<(u64, UnreadRow)>, ServiceError> {
        let after = markers.get(UNTHREADED).copied().unwrap_or(0).saturating_add(1);
        let (user, room) = (user_id.as_str(), room_id.as_str());
        let own_range =
            KeyRange::between(&keys::push_unread(user, room, after), &keys::push_unread(user, room, u64::MAX));
        let own = self.kv.scan(Table::PushUnread, &own_range, Direction::Backward, MAX_COUNTED_UNREAD).await?;
        let own: BTreeMap<u64, UnreadRow> = own
            .into_iter()
            .filter_map(|(key, value)| Some((keys::trailing_position(&key)?, UnreadRow::decode(&value)?)))
            .collect();
        let shared_range = KeyRange::between(
            &keys::push_room_notification(room, after),
            &keys::push_room_notification(room, u64::MAX),
        );
        let shared =
            self.kv.scan(Table::PushRoomNotifications, &shared_range, Direction::Backward, MAX_COUNTED_UNREAD).await?;
        let mut rows: Vec<(u64, UnreadRow)> = shared
            .into_iter()
            .filter_map(|(key, value)| Some((keys::trailing_position(&key)?, SharedRow::decode(&value)?)))
            .filter(|(position, row)| row.sender != user && !own.contains_key(position))
            .map(|(position, row)| {
                (position, UnreadRow { thread: row.thread, highlight: row.highlight, suppressed: false })
            })
            .collect();
        rows.extend(own.into_iter().filter(|(_, row)| !row.suppressed));
        rows.sort_unstable_by_key(|(position, _)| *position);
        Ok(rows)
    }

    /// `counts.unread` of a push to the user's gateways, read at delivery: the number of rooms
    /// (of `joined_rooms`, the user's) with unread notifications (what Element's and most apps'
    /// badges show), or with `push.badge_counts_messages` the number of unread notifying events
    /// (each room's counted up to [`MAX_COUNTED_UNREAD`]). One short read per room, at most
    /// [`MAX_BADGE_ROOMS`] rooms; rooms left are read at the leave ([`Push::left_room_into`]).
    pub async fn badge_count(&self, user_id: &UserId, joined_rooms: &[OwnedRoomId]) -> Result<u64, ServiceError> {
        let mut unread = 0;
        for room_id in joined_rooms.iter().take(MAX_BADGE_ROOMS) {
            let notifications = self.room_counts(user_id, room_id).await?.room.notifications;
            unread += match self.badge_counts_messages {
                true => notifications,
                false => u64::from(notifications > 0),
            };
        }
        Ok(unread)
    }

    /// A joined room's part of `/sync` gets its counts: `unread_notifications`, and with
    /// `per_thread` (the filter's `unread_thread_notifications`) the main timeline's counts
    /// there and each thread's in `unread_thread_notifications`.
    pub(crate) async fn add_unread_counts(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        per_thread: bool,
        room: &mut serde_json::Value,
    ) -> Result<(), ServiceError> {
        let counts = self.room_counts(user_id, room_id).await?;
        let json = |c: &UnreadCounts| serde_json::json!({ "notification_count": c.notifications, "highlight_count": c.highlights });
        if per_thread {
            room["unread_notifications"] = json(&counts.main);
            let threads: serde_json::Map<String, serde_json::Value> =
                counts.threads.iter().map(|(root, c)| (root.clone(), json(c))).collect();
            room["unread_thread_notifications"] = serde_json::Value::Object(threads);
        } else {
            room["unread_notifications"] = json(&counts.room);
        }
        Ok(())
    }

    /// `GET /notifications`: the user's notifications, newest first, before `from` (a token of
    /// an earlier page), `only=highlight` keeping highlights alone: their own rows, and the
    /// shared rows of `joined_rooms` (the user's) since they joined, but their own events and
    /// the events their own rows decide.
    pub async fn notifications(
        &self,
        user_id: &UserId,
        joined_rooms: &[OwnedRoomId],
        from: Option<&str>,
        limit: Option<usize>,
        only_highlights: bool,
    ) -> Result<NotificationsPage, ServiceError> {
        let before = match from {
            Some(token) => {
                token.parse::<u64>().map_err(|_| ServiceError::InvalidParam(format!("unknown from token {token:?}")))?
            }
            None => u64::MAX,
        };
        let limit = limit.unwrap_or(DEFAULT_NOTIFICATIONS_LIMIT).clamp(1, MAX_NOTIFICATIONS_LIMIT);
        // Position → the actions of the user's own row, or `None` for a room's shared row.
        let mut found: BTreeMap<u64, Option<Vec<Action>>> = BTreeMap::new();
        for (position, actions) in self.own_notifications(user_id, before, limit, only_highlights).await? {
            found.insert(position, Some(actions));
        }
        for room_id in joined_rooms.iter().take(MAX_BADGE_ROOMS) {
            for position in self.shared_notifications(user_id, room_id, before, limit, only_highlights).await? {
                found.entry(position).or_insert(None);
            }
        }
        let mut markers: HashMap<String, HashMap<String, u64>> = HashMap::new();
        let mut notifications = Vec::new();
        let mut next_token = None;
        for (position, own) in found.into_iter().rev() {
            let shared_key = keys::push_event(position);
            let shared = lattice_storage::get::<PushEventRecord>(self.kv.as_ref(), &shared_key).await?;
            let Some(record) = shared.map(|stored| stored.value) else { continue };
            let actions = match own {
                Some(actions) => actions,
                None => match record.actions.clone().map(serde_json::from_value::<Vec<Action>>) {
                    Some(Ok(actions)) => actions,
                    _ => continue,
                },
            };
            let Ok(room_id) = OwnedRoomId::try_from(record.room_id.clone()) else { continue };
            if !markers.contains_key(room_id.as_str()) {
                let read = self.read_markers(user_id, &room_id).await?;
                markers.insert(room_id.to_string(), read);
            }
            let room_markers = &markers[room_id.as_str()];
            let thread_key = record.thread.as_deref().unwrap_or(MAIN_THREAD);
            let read = [UNTHREADED, thread_key]
                .iter()
                .any(|thread| room_markers.get(*thread).is_some_and(|&read| position <= read));
            notifications.push(Notification { room_id, event_id: record.event_id, actions, read, ts: record.ts });
            if notifications.len() == limit {
                next_token = Some(position.to_string());
                break;
            }
        }
        Ok(NotificationsPage { notifications, next_token })
    }

    /// The newest `limit` of the user's own notifying rows before `before` (highlights only
    /// with `only_highlights`), with their actions. Rows that leave the user out of a shared
    /// row (`[]`) are not notifications.
    async fn own_notifications(
        &self,
        user_id: &UserId,
        before: u64,
        limit: usize,
        only_highlights: bool,
    ) -> Result<Vec<(u64, Vec<Action>)>, ServiceError> {
        let user = user_id.as_str();
        let mut range = KeyRange::between(&keys::push_notification(user, 0), &keys::push_notification(user, before));
        let mut listed = Vec::new();
        // Highlights may be sparse: read pages until the limit is met or the rows end.
        loop {
            let page =
                self.kv.scan(Table::PushNotifications, &range, Direction::Backward, MAX_NOTIFICATIONS_LIMIT).await?;
            let full = page.len() == MAX_NOTIFICATIONS_LIMIT;
            for (key, value) in page {
                range.end = std::ops::Bound::Excluded(key.clone());
                let Some(position) = keys::trailing_position(&key) else { continue };
                let Ok(actions) = serde_json::from_slice::<Vec<Action>>(&value) else { continue };
                let listed_here = actions.iter().any(Action::should_notify)
                    && (!only_highlights || actions.iter().any(Action::is_highlight));
                if listed_here {
                    listed.push((position, actions));
                    if listed.len() == limit {
                        return Ok(listed);
                    }
                }
            }
            if !full {
                return Ok(listed);
            }
        }
    }

    /// The positions of the newest `limit` shared rows of the room before `before` that notified
    /// the user: after their join, not their own events, not decided by a row of their own.
    async fn shared_notifications(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        before: u64,
        limit: usize,
        only_highlights: bool,
    ) -> Result<Vec<u64>, ServiceError> {
        let (user, room) = (user_id.as_str(), room_id.as_str());
        let joined = self.kv.get(Table::PushReadMarkers, &keys::push_read_marker(user, room, JOINED)).await?;
        let since = joined.as_deref().and_then(keys::stored_position).unwrap_or(0);
        let mut range = KeyRange::between(
            &keys::push_room_notification(room, since.saturating_add(1)),
            &keys::push_room_notification(room, before),
        );
        let mut listed = Vec::new();
        for _ in 0..MAX_SHARED_PAGES {
            let page = self
                .kv
                .scan(Table::PushRoomNotifications, &range, Direction::Backward, MAX_NOTIFICATIONS_LIMIT)
                .await?;
            let full = page.len() == MAX_NOTIFICATIONS_LIMIT;
            for (key, value) in page {
                range.end = std::ops::Bound::Excluded(key.clone());
                let (Some(position), Some(row)) = (keys::trailing_position(&key), SharedRow::decode(&value)) else {
                    continue;
                };
                if row.sender == user || (only_highlights && !row.highlight) {
                    continue;
                }
                let own = self.kv.get(Table::PushNotifications, &keys::push_notification(user, position)).await?;
                if own.is_some() {
                    continue;
                }
                listed.push(position);
                if listed.len() == limit {
                    return Ok(listed);
                }
            }
            if !full {
                break;
            }
        }
        Ok(listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_rows_read_back_as_written_and_unknown_flags_are_refused() {
        for row in [
            UnreadRow { thread: None, highlight: false, suppressed: false },
            UnreadRow { thread: Some("$root".into()), highlight: true, suppressed: false },
            UnreadRow { thread: Some("$root".into()), highlight: false, suppressed: true },
        ] {
            assert_eq!(UnreadRow::decode(&row.encode()), Some(row));
        }
        for row in [
            SharedRow { highlight: false, sender: "@alice:hs.test".into(), thread: None },
            SharedRow { highlight: true, sender: "@alice:hs.test".into(), thread: Some("$root".into()) },
        ] {
            assert_eq!(SharedRow::decode(&row.encode()), Some(row));
        }
        assert_eq!(UnreadRow::decode(&[3]), None);
        assert_eq!(SharedRow::decode(&[2, b'@', 0]), None);
        assert_eq!(SharedRow::decode(&[1, b'@']), None, "no separator after the sender");
        assert_eq!(SharedRow::decode(&[]), None);
    }
}
