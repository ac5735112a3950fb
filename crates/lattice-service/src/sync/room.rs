//! One room's part of `/sync`: a joined room's timeline, state, ephemeral events, account data
//! and summary; a left room up to the leave; an invite's or a knock's stripped state. Everything
//! about the room is read through the rooms service's API.

use std::collections::{BTreeSet, HashSet};

use lattice_storage::records::OutOfBandRecord;
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

use super::tokens::token;
use super::{Sync, SyncScope};
use crate::ServiceError;
use crate::rooms::{
    EventFilter, MAX_FILTERED_SCAN, MAX_HIDDEN_RUN, MAX_TIMELINE_LIMIT, Viewer, history_position, visible,
};

const DEFAULT_TIMELINE_LIMIT: usize = 20;
/// Members the room summary names.
const MAX_HEROES: usize = 5;
/// Member rows looked at to find them (left and banned members are passed over).
const MAX_HERO_CANDIDATES: usize = 100;

/// One room's timeline page and the state that goes with it.
struct TimelinePage {
    events: Vec<Value>,
    limited: bool,
    first_position: u64,
    /// The oldest event of the page, where `prev_batch` continues into the room's history.
    first_event: Option<String>,
}

impl Sync {
    /// A joined room's part of the sync: timeline, state, ephemeral events, account data and
    /// summary; `None` when nothing in it changed. `changed`: the room has events after `since`
    /// (when it has none, its timeline is not read at all).
    pub(super) async fn joined_room(
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
    pub(super) async fn left_room(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
    ) -> Result<Option<Value>, ServiceError> {
        // Nothing after the user left is theirs to see.
        let (since, now) = (scope.since.events, scope.now.events);
        if let Some(left) = self.rooms.out_of_band(scope.user_id, room_id).await? {
            // A refused invite to a room this server is not in: the refusal is all there is.
            if left.stream_position <= since || left.stream_position > now {
                return Ok(None);
            }
            let event = self.rooms.client_event(&left.event_id).await?;
            return Ok(Some(json!({
                "timeline": { "events": [event], "limited": false, "prev_batch": token(left.stream_position - 1) },
                "state": { "events": [] },
            })));
        }
        let left_at = self.rooms.membership_position(scope.user_id, room_id).await?.unwrap_or(since).min(now);
        if left_at <= since {
            return Ok(None);
        }
        let Some(membership_id) = self.rooms.current_member_event(scope.user_id, room_id).await? else {
            return Ok(None);
        };
        if !self.was_joined_before(scope.user_id, &membership_id).await? {
            // Never a member (a refused invite or knock): the membership change is all there is.
            let event = self.rooms.client_event(&membership_id).await?;
            return Ok(Some(json!({
                "timeline": { "events": [event], "limited": false, "prev_batch": token(left_at.saturating_sub(1)) },
                "state": { "events": [] },
            })));
        }
        let Some(leave) = self.rooms.event_record(&membership_id).await? else {
            return Ok(None);
        };
        self.room_sync(scope, room_id, (left_at, Some(leave.state_group))).await
    }

    /// Whether the user joined the room after `since`, from not being joined at `since`.
    pub(super) async fn newly_joined(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        since: u64,
    ) -> Result<bool, ServiceError> {
        if self.rooms.membership_position(user_id, room_id).await?.is_none_or(|position| position <= since) {
            return Ok(false);
        }
        Ok(!self.rooms.was_joined_at(user_id, room_id, since).await?)
    }

    /// Whether the user was joined just before `membership_id` (their leave or ban) took effect:
    /// the membership in the state after the event it was built on.
    async fn was_joined_before(&self, user_id: &UserId, membership_id: &str) -> Result<bool, ServiceError> {
        Ok(self.rooms.membership_before(membership_id, user_id).await?.as_deref() == Some("join"))
    }

    /// Typing and receipts changed in the sync's range, as the filter and ignore list allow.
    async fn ephemeral_events(&self, scope: &SyncScope<'_>, room_id: &RoomId) -> Result<Vec<Value>, ServiceError> {
        let filter = &scope.filter.room.ephemeral;
        let mut ephemeral = Vec::new();
        if filter.allows_type("m.typing")
            && let Some(users) = self.rooms.typing_since(room_id, scope.since.typing, scope.now.typing, scope.initial)
        {
            let users: Vec<_> = users.into_iter().filter(|u| !scope.ignored.contains(u.as_str())).collect();
            ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
        }
        if filter.allows_type("m.receipt")
            && let Some(mut receipts) =
                self.rooms.receipts_since(scope.user_id, room_id, scope.since.receipts, scope.now.receipts).await?
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
        let record = self.rooms.event_record(first).await?;
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
            let rows = self.rooms.timeline_rows_before(&room_id, (from + 1, end), limit + 1).await?;
            if rows.is_empty() {
                break;
            }
            scanned += rows.len();
            let exhausted = rows.len() <= limit;
            for (position, event_id) in rows {
                end = position;
                if !self.rooms.may_see_at(viewer, &event_id, position).await? {
                    hidden_run += 1;
                    if hidden_run == MAX_HIDDEN_RUN {
                        limited = true;
                        break 'scan;
                    }
                    continue;
                }
                hidden_run = 0;
                let event = self.rooms.timeline_event(viewer, &event_id).await?;
                if !visible(&event, filter, ignored) {
                    continue;
                }
                if events.len() == limit {
                    limited = true;
                    break 'scan;
                }
                first_position = position;
                first_event = Some(event_id);
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
                if let Some(id) = self.rooms.current_state_id(room_id, "m.room.member", member).await?
                    && !in_timeline.contains(id.as_str())
                {
                    state.push(self.rooms.client_event(&id).await?);
                }
            }
            return Ok(state);
        }
        let room_state = self.rooms.state_entries(room_id, at_group).await?;
        for (kind, key, id) in &room_state {
            let is_member = kind == "m.room.member";
            // Lazy loading sends only the members the timeline needs.
            let wanted = if lazy && is_member { needed_members.contains(key.as_str()) } else { whole_state };
            if !wanted || in_timeline.contains(id.as_str()) {
                continue;
            }
            let event = self.rooms.client_event(id).await?;
            if (is_member && lazy) || scope.filter.room.state.allows(&event) {
                state.push(event);
            }
        }
        Ok(state)
    }

    /// `summary`: joined and invited counts and up to five other members to name the room by.
    async fn room_summary(&self, user_id: &UserId, room_id: &RoomId) -> Result<Value, ServiceError> {
        let Some(counts) = self.rooms.member_counts(room_id).await? else {
            return self.counted_room_summary(user_id, room_id).await;
        };
        let mut heroes = Vec::new();
        for (member, _) in self.rooms.first_member_event_ids(room_id, MAX_HERO_CANDIDATES).await? {
            if heroes.len() == MAX_HEROES {
                break;
            }
            let Ok(member_id) = UserId::parse(member.as_str()) else { continue };
            let membership = self.rooms.membership(&member_id, room_id).await?;
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
        for (member, event_id) in self.rooms.member_event_ids(room_id).await? {
            let event = self.rooms.client_event(&event_id).await?;
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

    /// An invite with the stripped state the spec suggests, when it is new since `since` and
    /// its sender is not ignored.
    pub(super) async fn invited_room_sync(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
    ) -> Result<Option<Value>, ServiceError> {
        let user_id = scope.user_id;
        if let Some(invite) = self.rooms.out_of_band(user_id, room_id).await? {
            return self.out_of_band_invite_sync(scope, invite).await;
        }
        let Some(invite_id) = self.rooms.current_state_id(room_id, "m.room.member", user_id.as_str()).await? else {
            return Ok(None);
        };
        let record = self.rooms.event_record(&invite_id).await?;
        if record.and_then(|r| r.stream_position).is_none_or(|position| position <= scope.since.events) {
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
            if let Some(id) = self.rooms.current_state_id(room_id, kind, key).await? {
                let event = self.rooms.client_event(&id).await?;
                if kind == "m.room.member" && scope.ignored.contains(event["sender"].as_str().unwrap_or_default()) {
                    return Ok(None);
                }
                stripped.push(json!({ "type": event["type"], "state_key": event["state_key"], "content": event["content"], "sender": event["sender"] }));
            }
        }
        Ok(Some(json!({ "invite_state": { "events": stripped } })))
    }

    /// An invite from another server to a room this server is not in, or a knock on one: the
    /// stripped state the room's server sent, and the membership event itself.
    async fn out_of_band_invite_sync(
        &self,
        scope: &SyncScope<'_>,
        invite: OutOfBandRecord,
    ) -> Result<Option<Value>, ServiceError> {
        let (since, now) = (scope.since.events, scope.now.events);
        let pending = matches!(invite.membership.as_str(), "invite" | "knock");
        if !pending || invite.stream_position <= since || invite.stream_position > now {
            return Ok(None);
        }
        let event = self.rooms.client_event(&invite.event_id).await?;
        if scope.ignored.contains(event["sender"].as_str().unwrap_or_default()) {
            return Ok(None);
        }
        let mut stripped: Vec<Value> = invite
            .stripped_state
            .into_iter()
            .filter(|entry| !(entry["type"] == "m.room.member" && entry["state_key"] == scope.user_id.as_str()))
            .collect();
        stripped.push(json!({ "type": event["type"], "state_key": event["state_key"], "content": event["content"], "sender": event["sender"] }));
        Ok(Some(json!({ "invite_state": { "events": stripped } })))
    }

    /// A knock in `/sync` (`rooms.knock`): the same stripped state an invite carries, as
    /// `knock_state`, when the knock is new since `since`.
    pub(super) async fn knocked_room_sync(
        &self,
        scope: &SyncScope<'_>,
        room_id: &RoomId,
    ) -> Result<Option<Value>, ServiceError> {
        Ok(self
            .invited_room_sync(scope, room_id)
            .await?
            .map(|mut room| json!({ "knock_state": room["invite_state"].take() })))
    }
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
