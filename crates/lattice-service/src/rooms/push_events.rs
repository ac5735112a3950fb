//! The rooms side of push: after a live event is stored, the facts push rules need — the local
//! joined members but the sender with their display names, the joined-member count, and the
//! sender's power to notify the room — are gathered here and handed to the push service, which
//! owns the notifications. Cost per event: one scan of the room's member rows (keys only), one
//! event read per local member, the create and power-levels events, and one ruleset read per
//! local member in the push service; nothing is re-scanned later. Those facts are kept per room
//! for the room's current state group ([`PushFactsCache`]), and rulesets per user in the push
//! service, so a message into a room whose state did not change reads neither; after a join,
//! leave or display-name change the facts are brought forward by reading only the members that
//! changed, so joining a big room does not cost a read per member.

use lattice_core::event::Pdu;
use lattice_core::power::RoomPower;
use lattice_core::room_version::RoomVersion;
use lattice_storage::keys;
use lattice_storage::records::{EventRecord, RoomRecord, StateGroupRecord};
use ruma::events::TimelineEventType;
use ruma::events::room::power_levels::UserPowerLevel;
use ruma::power_levels::NotificationPowerLevels;
use ruma::push::PushConditionPowerLevelsCtx;
use ruma::room_version_rules::RoomPowerLevelsRules;
use ruma::state_res::Event;
use ruma::{Int, OwnedRoomId, OwnedUserId, RoomId};
use serde_json::Value;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::Rooms;
use super::membership::content_of;
use crate::ServiceError;
use crate::push::{PushedEvent, Recipient};

impl Rooms {
    /// Runs push rules over a live event for the room's local members, adding what it notified
    /// to the event's batch; returns whether a push was queued. A failure here is logged, not
    /// returned: the event is stored and must be acknowledged.
    pub(super) async fn push_event(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        event: &Pdu,
        position: u64,
        batch: &mut lattice_storage::WriteBatch,
    ) -> bool {
        match self.try_push_event(version, room_id, event, position, batch).await {
            Ok(queued) => queued,
            Err(error) => {
                tracing::warn!(room = %room_id, event = %event.id(), %error, "push rules were not evaluated");
                false
            }
        }
    }

    async fn try_push_event(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        event: &Pdu,
        position: u64,
        batch: &mut lattice_storage::WriteBatch,
    ) -> Result<bool, ServiceError> {
        self.mark_membership(room_id, event, position, batch).await?;
        // The create event comes before the room's record: nobody is there to notify.
        let Some(facts) = self.push_facts(room_id).await? else { return Ok(false) };
        if facts.recipients.iter().all(|recipient| recipient.user_id == *event.sender()) {
            return Ok(false);
        }
        let json =
            serde_json::value::to_raw_value(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let content: Value = serde_json::from_str(event.content().get()).unwrap_or_default();
        let relation = &content["m.relates_to"];
        let thread = (relation["rel_type"] == "m.thread").then(|| relation["event_id"].as_str()).flatten();
        let power_levels = self.cached_sender_power(version, room_id, &facts, event.sender()).await?;
        let pushed = PushedEvent {
            room_id,
            event_id: event.id().as_str(),
            position,
            ts: event.origin_server_ts().get().into(),
            json: &json,
            thread: thread.map(str::to_owned),
            member_count: facts.member_count,
            power_levels,
        };
        self.push.notifications_into(&pushed, facts.state_group, &facts.recipients, batch).await
    }

    /// A local user's leave, kick or ban reads everything they had unread in the room, so a
    /// room they are no longer in never counts in the badge of their pushes; their join (from
    /// any other membership: not a display-name change) starts their counts there. The
    /// membership read is the one before this event: the event's batch is not written yet.
    async fn mark_membership(
        &self,
        room_id: &RoomId,
        event: &Pdu,
        position: u64,
        batch: &mut lattice_storage::WriteBatch,
    ) -> Result<(), ServiceError> {
        if *event.kind() != TimelineEventType::RoomMember {
            return Ok(());
        }
        let Some(user_id) = event.state_key().and_then(|key| ruma::UserId::parse(key).ok()) else { return Ok(()) };
        if user_id.server_name() != self.server_name() {
            return Ok(());
        }
        let content: Value = serde_json::from_str(event.content().get()).unwrap_or_default();
        match content["membership"].as_str() {
            Some("leave" | "ban") => self.push.left_room_into(&user_id, room_id, position, batch).await?,
            Some("join") if self.membership(&user_id, room_id).await?.as_deref() != Some("join") => {
                self.push.joined_room_into(&user_id, room_id, position, batch);
            }
            _ => {}
        }
        Ok(())
    }

    /// The room's push facts at its current state: from the cache when the room's current state
    /// group is the one they were gathered at, else gathered again. The caller holds the room's
    /// lock, so the current state cannot move between the group read and the gathering.
    async fn push_facts(&self, room_id: &RoomId) -> Result<Option<Arc<PushFacts>>, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        let Some(room) = room.map(|room| room.value) else { return Ok(None) };
        if let Some(facts) = self.push_facts.get(room_id, room.current_state_group) {
            return Ok(Some(facts));
        }
        let carried = match self.push_facts.any(room_id) {
            Some(previous) => self.facts_brought_forward(&previous, room.current_state_group).await?,
            None => None,
        };
        let (recipients, senders) = match carried {
            Some(carried) => carried,
            None => (self.push_recipients(room_id).await?, HashMap::new()),
        };
        let member_count = match room.member_counts {
            Some(counts) => counts.joined,
            None => self.joined_count(room_id).await?,
        };
        let facts = Arc::new(PushFacts {
            state_group: room.current_state_group,
            recipients,
            member_count,
            senders: std::sync::Mutex::new(senders),
        });
        self.push_facts.insert(room_id, facts.clone());
        Ok(Some(facts))
    }

    /// The recipients of `previous` brought forward to the state group `group`, when only
    /// member events lie between the two (a join, a leave, a display-name change: the usual
    /// state change of a big room), with the senders' power kept, since it depends on the create
    /// and power-levels events only. Reads the state groups in between and the changed members'
    /// events. `None` when the way back from `group` is not a short chain of member changes
    /// ending at `previous`'s group (another kind of state event, a full snapshot, a fork
    /// resolved): then the facts are gathered again.
    async fn facts_brought_forward(
        &self,
        previous: &PushFacts,
        group: u64,
    ) -> Result<Option<(Vec<Recipient>, SenderPowers)>, ServiceError> {
        // Newest first.
        let mut changes = Vec::new();
        let mut at = group;
        let mut steps = 0;
        while at != previous.state_group {
            if steps == MAX_GROUPS_BROUGHT_FORWARD {
                return Ok(None);
            }
            steps += 1;
            let record = lattice_storage::get::<StateGroupRecord>(self.kv.as_ref(), &keys::state_group(at)).await?;
            let Some(StateGroupRecord { parent: Some(parent), delta, .. }) = record.map(|r| r.value) else {
                return Ok(None);
            };
            for (kind, user, event_id) in delta {
                if kind != TimelineEventType::RoomMember.to_string() {
                    return Ok(None);
                }
                changes.push((user, event_id));
            }
            at = parent;
        }
        let mut recipients = previous.recipients.clone();
        let mut seen = HashSet::new();
        for (user, event_id) in changes {
            // The newest change of each member is the one in force.
            if !seen.insert(user.clone()) {
                continue;
            }
            recipients.retain(|recipient| recipient.user_id.as_str() != user);
            if !event_id.is_empty()
                && let Some(recipient) = self.recipient_of(user, &event_id).await?
            {
                recipients.push(recipient);
            }
        }
        let senders = previous.senders.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        Ok(Some((recipients, senders)))
    }

    /// The room's joined members of this server, with their display names.
    async fn push_recipients(&self, room_id: &RoomId) -> Result<Vec<Recipient>, ServiceError> {
        let mut recipients = Vec::new();
        for (user, member_event) in self.member_event_ids(room_id).await? {
            recipients.extend(self.recipient_of(user, &member_event).await?);
        }
        Ok(recipients)
    }

    /// `user` as a recipient when they are of this server and `member_event` joins them.
    async fn recipient_of(&self, user: String, member_event: &str) -> Result<Option<Recipient>, ServiceError> {
        let local = user.strip_suffix(self.server_name().as_str()).is_some_and(|rest| rest.ends_with(':'));
        let Ok(user_id) = OwnedUserId::try_from(user) else { return Ok(None) };
        if !local {
            return Ok(None);
        }
        let Some(record) = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(member_event)).await?
        else {
            return Ok(None);
        };
        let member: Value = serde_json::from_str(&record.value.json).unwrap_or_default();
        if member["content"]["membership"] != "join" {
            return Ok(None);
        }
        let display_name = member["content"]["displayname"].as_str().unwrap_or(user_id.localpart()).to_owned();
        Ok(Some(Recipient { user_id, display_name }))
    }

    /// [`Rooms::sender_power`], kept in the room's facts per sender (it depends only on the
    /// create and power-levels events, both part of the state the facts belong to).
    async fn cached_sender_power(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        facts: &PushFacts,
        sender: &ruma::UserId,
    ) -> Result<Option<PushConditionPowerLevelsCtx>, ServiceError> {
        if let Some(known) = facts.sender(sender) {
            return Ok(known);
        }
        let power = self.sender_power(version, room_id, sender).await?;
        facts.remember_sender(sender, power.clone());
        Ok(power)
    }

    async fn joined_count(&self, room_id: &RoomId) -> Result<u64, ServiceError> {
        let mut joined = 0;
        for (_, member_event) in self.member_event_ids(room_id).await? {
            let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&member_event)).await?;
            let member: Value = record.and_then(|r| serde_json::from_str(&r.value.json).ok()).unwrap_or_default();
            joined += u64::from(member["content"]["membership"] == "join");
        }
        Ok(joined)
    }

    /// The power-levels facts of `sender_notification_permission`: the sender's level and the
    /// levels the room asks for notifications. Only the sender's level is ever asked for.
    async fn sender_power(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        sender: &ruma::UserId,
    ) -> Result<Option<PushConditionPowerLevelsCtx>, ServiceError> {
        let (create, power_levels) = self.power_events(version, room_id).await?;
        let power = RoomPower::new(version, &create, power_levels.as_ref()).map_err(ServiceError::Internal)?;
        let notifications = match &power_levels {
            Some(levels) => {
                let content = content_of(levels)?;
                serde_json::from_value::<NotificationPowerLevels>(content["notifications"].clone()).unwrap_or_default()
            }
            None => NotificationPowerLevels::new(),
        };
        let (level, creators) = match power.user_level(sender).map_err(ServiceError::Internal)? {
            UserPowerLevel::Int(level) => (level, Vec::new()),
            // A v12 creator outranks every level.
            _ => (Int::MAX, vec![sender.to_owned()]),
        };
        let rules = RoomPowerLevelsRules::new(&version.rules().authorization, creators);
        let users = [(sender.to_owned(), level)].into();
        Ok(Some(PushConditionPowerLevelsCtx::new(users, level, notifications, rules)))
    }
}

/// What push rules need of a room at one current state: its local joined members with their
/// display names, its joined-member count, and each sender's notification power as asked so
/// far. A message does not change the state, so every message after the first reads none of
/// this again; a state event makes a new current state group and the next event gathers anew.
pub(super) struct PushFacts {
    state_group: u64,
    recipients: Vec<Recipient>,
    member_count: u64,
    senders: std::sync::Mutex<SenderPowers>,
}

/// Each sender's notification power, as asked so far.
type SenderPowers = HashMap<OwnedUserId, Option<PushConditionPowerLevelsCtx>>;

/// How many state groups back a room's facts are brought forward rather than gathered again.
const MAX_GROUPS_BROUGHT_FORWARD: usize = 8;

/// At most this many senders' power is kept per room state.
const MAX_SENDERS_PER_FACTS: usize = 1_000;
/// At most this many rooms' facts are kept; past it an arbitrary room's make way.
const MAX_ROOMS_WITH_FACTS: usize = 10_000;

impl PushFacts {
    fn sender(&self, sender: &ruma::UserId) -> Option<Option<PushConditionPowerLevelsCtx>> {
        self.senders.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(sender).cloned()
    }

    fn remember_sender(&self, sender: &ruma::UserId, power: Option<PushConditionPowerLevelsCtx>) {
        let mut senders = self.senders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if senders.len() < MAX_SENDERS_PER_FACTS {
            senders.insert(sender.to_owned(), power);
        }
    }
}

/// The rooms' push facts, each valid for the current state group it was gathered at.
#[derive(Default)]
pub(super) struct PushFactsCache {
    rooms: std::sync::Mutex<HashMap<OwnedRoomId, Arc<PushFacts>>>,
}

impl PushFactsCache {
    fn get(&self, room_id: &RoomId, state_group: u64) -> Option<Arc<PushFacts>> {
        let rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        rooms.get(room_id).filter(|facts| facts.state_group == state_group).cloned()
    }

    /// The room's facts at whatever state group they were gathered at.
    fn any(&self, room_id: &RoomId) -> Option<Arc<PushFacts>> {
        self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(room_id).cloned()
    }

    fn insert(&self, room_id: &RoomId, facts: Arc<PushFacts>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if rooms.len() >= MAX_ROOMS_WITH_FACTS
            && !rooms.contains_key(room_id)
            && let Some(any) = rooms.keys().next().cloned()
        {
            rooms.remove(&any);
        }
        rooms.insert(room_id.to_owned(), facts);
    }
}
