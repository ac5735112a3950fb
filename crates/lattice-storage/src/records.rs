//! The records Lattice stores, one type per table. Fields added later carry `#[serde(default)]`
//! so older rows still read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Record, Table};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: String,
    /// PHC-format argon2id hash; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    pub admin: bool,
    /// Deactivated accounts keep this row forever so the name is never handed out again.
    pub deactivated: bool,
    pub created_ms: u64,
}

impl Record for UserRecord {
    const TABLE: Table = Table::Users;
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

impl Record for ProfileRecord {
    const TABLE: Table = Table::Profiles;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub display_name: Option<String>,
    pub created_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub last_seen_ip: Option<String>,
    /// Hex SHA-256 of the device's current access token, so deleting the device revokes it.
    pub access_token_hash: String,
    /// Hex SHA-256 of the device's current refresh token, if it uses refresh tokens.
    pub refresh_token_hash: Option<String>,
    /// A dehydrated device (MSC3814): it has no tokens and no one may log in to it; rows from
    /// before the field read as `false`, and ordinary devices keep their stored form.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dehydrated: bool,
}

impl Record for DeviceRecord {
    const TABLE: Table = Table::Devices;
}

/// A user's dehydrated device (MSC3814): which device it is, and the encrypted data its owner
/// stored with it, handed back verbatim to the owner's next login.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DehydratedDeviceRecord {
    pub device_id: String,
    pub device_data: serde_json::Value,
}

impl Record for DehydratedDeviceRecord {
    const TABLE: Table = Table::DehydratedDevices;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenRecord {
    pub user_id: String,
    pub device_id: String,
    /// Tokens issued with a refresh token expire; others live until logout.
    pub expires_ms: Option<u64>,
}

impl Record for AccessTokenRecord {
    const TABLE: Table = Table::AccessTokens;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshTokenRecord {
    pub user_id: String,
    pub device_id: String,
}

impl Record for RefreshTokenRecord {
    const TABLE: Table = Table::RefreshTokens;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationTokenRecord {
    pub token: String,
    /// `None`: unlimited.
    pub uses_allowed: Option<u32>,
    pub completed: u32,
    pub expiry_ms: Option<u64>,
    pub created_ms: u64,
}

impl Record for RegistrationTokenRecord {
    const TABLE: Table = Table::RegistrationTokens;
}

/// A user-interactive authentication session in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UiaSessionRecord {
    /// The endpoint the session authorises, so a session cannot be replayed on another one.
    pub purpose: String,
    /// The user the session is for; `None` during registration.
    pub user_id: Option<String>,
    pub completed_stages: Vec<String>,
    /// The registration token a completed `m.login.registration_token` stage checked; it is
    /// only spent when the account is created.
    #[serde(default)]
    pub registration_token: Option<String>,
    pub created_ms: u64,
}

impl Record for UiaSessionRecord {
    const TABLE: Table = Table::UiaSessions;
}

/// A JSON object stored as given by the client (account data, filters).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JsonObject(pub BTreeMap<String, serde_json::Value>);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountDataRecord(pub JsonObject);

impl Record for AccountDataRecord {
    const TABLE: Table = Table::AccountData;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FilterRecord(pub JsonObject);

impl Record for FilterRecord {
    const TABLE: Table = Table::Filters;
}

/// A room this server knows, and where its current state is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub room_version: String,
    pub create_event_id: String,
    /// The state group holding the room's current (resolved) state.
    pub current_state_group: u64,
    /// The room's forward extremities (events with no successor yet), oldest first. One value
    /// rather than a row each: rows that change on every event leave tombstones that every
    /// later prefix scan would have to step over.
    #[serde(default)]
    pub forward_extremities: Vec<String>,
    /// Changes with every accepted event, so a batch that expects this record unchanged fails
    /// when another event of the room was accepted meanwhile.
    #[serde(default)]
    pub last_stream_position: u64,
    /// Joined and invited members of the current state, kept by ingest so room summaries need
    /// no member scan. `None` for rooms stored before the counts existed (readers then count).
    #[serde(default)]
    pub member_counts: Option<MemberCounts>,
    /// How many of `forward_extremities` are at each state group (`(group, count)`, sorted), so
    /// a new event learns whether the room's front has one state or must be resolved without
    /// reading every extremity. `None` for rooms stored before it (rebuilt on the next event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extremity_groups: Option<Vec<(u64, u32)>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCounts {
    pub joined: u64,
    pub invited: u64,
}

impl MemberCounts {
    /// The counts after one member's membership changed from `old` to `new` (either absent).
    pub fn moved(self, old: Option<&str>, new: Option<&str>) -> Self {
        let count = |membership: Option<&str>, wanted: &str| u64::from(membership == Some(wanted));
        Self {
            joined: (self.joined + count(new, "join")).saturating_sub(count(old, "join")),
            invited: (self.invited + count(new, "invite")).saturating_sub(count(old, "invite")),
        }
    }
}

impl Record for RoomRecord {
    const TABLE: Table = Table::Rooms;
}

/// What the checks decided about a stored event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EventStatus {
    Accepted,
    /// Allowed by the state before it but not by the current state: kept, not shown, not built on.
    SoftFailed {
        reason: String,
    },
    /// Failed its checks: kept so it is not fetched again, never part of any state.
    Rejected {
        reason: String,
    },
    /// Stored without knowing the state before it (an auth event or state from another server's
    /// answer, an invite from another server, a fetched event): checked against its own auth
    /// events only, in no timeline and no state group until it is ingested again with its state.
    Outlier,
}

/// An event as stored: its canonical JSON and what ingest decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub room_id: String,
    /// The event's canonical JSON (its redacted form when its content hash did not match).
    pub json: String,
    pub status: EventStatus,
    /// Position in the global stream, for events that arrived live (what `/sync` delivers).
    pub stream_position: Option<u64>,
    /// The tiebreak after `depth` in the room's topological order (`keys::topological`): the
    /// stream position for live events, a stream counter value for backfilled ones (which have
    /// no stream position); `None` for outliers and events not accepted. Rows written before
    /// this field existed lack it: their order is their stream position ([`EventRecord::history_order`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u64>,
    /// The state of the room after this event (before it, for rejected events).
    pub state_group: u64,
    /// The redaction that took effect on this event, written in the redaction's own batch, so
    /// clients are told who removed it (`unsigned.redacted_because`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_by: Option<String>,
}

impl Record for EventRecord {
    const TABLE: Table = Table::Events;
}

impl EventRecord {
    /// The event's order in its room's history, when it is part of that history.
    pub fn history_order(&self) -> Option<u64> {
        self.order.or(self.stream_position)
    }
}

/// Room state stored as a delta against a parent group, so storage grows with the changes and
/// not with (events × state size). Every `SNAPSHOT_INTERVAL` links a full snapshot ends the chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateGroupRecord {
    pub parent: Option<u64>,
    /// `(event type, state key, event ID)`; an empty event ID removes the key.
    pub delta: Vec<(String, String, String)>,
    /// How many parents lie between this group and its snapshot.
    pub chain_length: u32,
}

impl Record for StateGroupRecord {
    const TABLE: Table = Table::StateGroups;
}

/// The auth chain of a state event (every event reachable through `auth_events`, itself
/// excluded), so state resolution needs no graph walk. Kept for state events only: they are the
/// only events that can be auth events, and a message's chain is the union of its auth events'.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuthChainRecord(pub Vec<String>);

impl Record for AuthChainRecord {
    const TABLE: Table = Table::AuthChains;
}

/// What a client transaction ID produced, so a retried send answers with the same event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRecord {
    pub event_id: String,
    /// SHA-256 (hex) of the request's type and content: a reused ID with other content is refused.
    pub request_hash: String,
}

impl Record for TransactionRecord {
    const TABLE: Table = Table::Transactions;
}

/// A read receipt: how far a user has read in a room (or one thread of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    pub user_id: String,
    pub receipt_type: String,
    pub event_id: String,
    /// `None`: the unthreaded receipt.
    pub thread_id: Option<String>,
    pub ts: u64,
    /// The stream position of this receipt, for `/sync`.
    pub stream_position: u64,
}

impl Record for ReceiptRecord {
    const TABLE: Table = Table::Receipts;
}

/// An event that notified at least one user, for `/notifications`: what every recipient's
/// notification of it shares, stored once per event. Each recipient's own row holds only the
/// actions of their rule (`push_notifications`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEventRecord {
    pub room_id: String,
    pub event_id: String,
    /// The thread root, for an event in a thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    pub ts: u64,
    /// The actions of the room's members without a row of their own (`push_room_notifications`),
    /// when the event notified them; absent in rows written before such rows existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<serde_json::Value>,
}

impl Record for PushEventRecord {
    const TABLE: Table = Table::PushEvents;
}

/// A pusher as the client set it (`POST /pushers/set`), in the spec's JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PusherRecord(pub serde_json::Value);

impl Record for PusherRecord {
    const TABLE: Table = Table::Pushers;
}

/// A notification waiting for delivery to one pusher's gateway, with its retry state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushQueueRecord {
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
    pub room_id: String,
    pub event_id: String,
    /// The event's type, sender and content (left out for `event_id_only` pushers).
    pub event_type: String,
    pub sender: String,
    pub content: serde_json::Value,
    /// The actions' tweaks (`sound`, `highlight`).
    pub tweaks: serde_json::Value,
    pub highlight: bool,
    /// The event's stream position (part of the row's key). A counts-only push (a badge update
    /// after a receipt) has empty `event_id` and `room_id`, the receipt's event's position here,
    /// and `u64::MAX` in its key, so one pusher's counts-only pushes share one row.
    pub position: u64,
    pub attempts: u32,
}

impl Record for PushQueueRecord {
    const TABLE: Table = Table::PushQueue;
}

/// A to-device message waiting in a device's inbox until the device syncs past it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToDeviceRecord {
    pub sender: String,
    pub event_type: String,
    pub content: JsonObject,
}

impl Record for ToDeviceRecord {
    const TABLE: Table = Table::ToDevice;
}

/// One relation (`m.relates_to`) of an accepted event to its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationRecord {
    pub event_id: String,
    pub rel_type: String,
    pub event_type: String,
    pub sender: String,
}

impl Record for RelationRecord {
    const TABLE: Table = Table::Relations;
}

/// A thread's summary, kept current by ingest so bundling it costs one read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRecord {
    pub latest_event_id: String,
    pub latest_position: u64,
    pub count: u64,
    /// Who wrote in the thread (its root's sender included), so `include=participated` and
    /// `current_user_participated` need no scan. Bounded by `MAX_THREAD_PARTICIPANTS`.
    pub participants: Vec<String>,
}

impl Record for ThreadRecord {
    const TABLE: Table = Table::Threads;
}

/// A room a user has forgotten, as of one membership event of theirs: the room stays forgotten
/// while that event is the user's current membership, so a later invite or join ends it with
/// no second write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgottenRoomRecord {
    pub membership_event_id: String,
}

impl Record for ForgottenRoomRecord {
    const TABLE: Table = Table::ForgottenRooms;
}

/// A local user's membership in a room this server is not in: an invite from another server
/// (with the state it came with, for clients to show the room), or the rejection of one. Keyed
/// like `memberships` (`user\0room`), beside the `memberships` row it explains; the room's own
/// membership rows end it once this server is in the room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfBandRecord {
    pub event_id: String,
    /// The room's version, which this server cannot read from a room it does not have.
    pub room_version: String,
    pub membership: String,
    /// Where the change sits in the event stream, so `/sync` shows it once.
    pub stream_position: u64,
    /// Stripped state events (`type`, `state_key`, `content`, `sender`) of the room, as the
    /// inviting server described it.
    #[serde(default)]
    pub stripped_state: Vec<serde_json::Value>,
}

impl Record for OutOfBandRecord {
    const TABLE: Table = Table::OutOfBandMemberships;
}

/// A local room alias: where it points and who made it (the creator may delete it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomAliasRecord {
    pub room_id: String,
    pub creator: String,
    pub created_ms: u64,
}

impl Record for RoomAliasRecord {
    const TABLE: Table = Table::RoomAliases;
}

/// A user's report of an event, a room or a user, for the server's operators
/// (`lattice report list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRecord {
    pub id: u64,
    pub received_ms: u64,
    pub reporter: String,
    /// The room of a reported event or a reported room.
    pub room_id: Option<String>,
    pub event_id: Option<String>,
    /// A reported user.
    pub user_id: Option<String>,
    pub reason: Option<String>,
    /// -100 (most offensive) to 0, for event reports.
    pub score: Option<i64>,
}

impl Record for ReportRecord {
    const TABLE: Table = Table::Reports;
}

/// An event's JSON as it was before a redaction took effect, kept for server admins for the
/// configured retention (`rooms.redaction_retention`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedactedOriginalRecord {
    /// The whole event, as stored before the redaction.
    pub json: String,
    pub redaction_id: String,
    /// When the redaction took effect here; the row is deleted once the retention has passed.
    pub redacted_ms: u64,
}

impl Record for RedactedOriginalRecord {
    const TABLE: Table = Table::RedactedOriginals;
}

/// A local user's presence as last changed (`presence` table, keyed by user ID): written on
/// a change of state, status message or of whether the user chose the state, never on a bare
/// sync, so a restart keeps the status and the last state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// `online`, `unavailable` or `offline`.
    pub presence: String,
    #[serde(default)]
    pub status_msg: Option<String>,
    /// When the user was last active (ms since the epoch), as of the change.
    #[serde(default)]
    pub last_active_ts: u64,
    /// The state was set through `PUT /presence` rather than by syncing.
    #[serde(default)]
    pub explicit: bool,
}

impl Record for PresenceRecord {
    const TABLE: Table = Table::Presence;
}

/// An event a local user scheduled to be sent later (MSC4140), keyed by its `delay_id` in
/// `delayed_events`; `delayed_events_due` and `delayed_events_by_user` index it, written in the
/// same batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayedEventRecord {
    pub delay_id: String,
    pub user_id: String,
    pub room_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub state_key: Option<String>,
    /// The content as the client sent it.
    pub content: serde_json::Value,
    pub delay_ms: u64,
    /// When the delay started: scheduling, or the last restart (ms since the epoch).
    pub running_since_ms: u64,
}

impl DelayedEventRecord {
    /// When the event falls due.
    pub fn due_ms(&self) -> u64 {
        self.running_since_ms.saturating_add(self.delay_ms)
    }
}

impl Record for DelayedEventRecord {
    const TABLE: Table = Table::DelayedEvents;
}

/// A delayed event that was sent or cancelled, kept for a while (`delayed_events_finalised`,
/// by `delay_id`) so its owner can learn what became of it and a repeated action answers as the
/// MSC says; `delayed_events_finalised_by_user` and `…_by_time` index it, in the same batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalisedDelayedEventRecord {
    /// The event as it was scheduled last.
    pub event: DelayedEventRecord,
    /// `send` or `cancel`.
    pub outcome: String,
    /// `action` (a management request), `delay` (it fell due) or `error` (it could not be sent).
    pub reason: String,
    /// The sent event's ID.
    #[serde(default)]
    pub event_id: Option<String>,
    /// Why it could not be sent (`reason` `error`).
    #[serde(default)]
    pub error: Option<DelayedEventError>,
    /// When it was finalised (ms since the epoch).
    pub finalised_ms: u64,
}

/// The error that kept a due delayed event from being sent: the kind of the service error (so
/// the HTTP edge maps it to its errcode in its one place) and its message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayedEventError {
    pub kind: String,
    pub message: String,
}

impl Record for FinalisedDelayedEventRecord {
    const TABLE: Table = Table::DelayedEventsFinalised;
}

/// What a client transaction ID of a delayed send produced, so a retry answers with the same
/// `delay_id` (`delayed_event_transactions`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayedTransactionRecord {
    pub delay_id: String,
    /// SHA-256 (hex) of the request: a reused ID with another request is refused.
    pub request_hash: String,
}

impl Record for DelayedTransactionRecord {
    const TABLE: Table = Table::DelayedEventTransactions;
}

#[cfg(test)]
mod tests {
    use super::MemberCounts;

    #[test]
    fn member_counts_follow_membership_changes() {
        let start = MemberCounts { joined: 2, invited: 1 };
        let cases = [
            (None, Some("join"), MemberCounts { joined: 3, invited: 1 }),
            (Some("invite"), Some("join"), MemberCounts { joined: 3, invited: 0 }),
            (Some("join"), Some("leave"), MemberCounts { joined: 1, invited: 1 }),
            (Some("join"), Some("ban"), MemberCounts { joined: 1, invited: 1 }),
            (Some("leave"), Some("invite"), MemberCounts { joined: 2, invited: 2 }),
            (Some("knock"), Some("leave"), start),
            (Some("join"), None, MemberCounts { joined: 1, invited: 1 }),
        ];
        for (old, new, expected) in cases {
            assert_eq!(start.moved(old, new), expected, "{old:?} -> {new:?}");
        }
        assert_eq!(MemberCounts::default().moved(Some("join"), Some("leave")), MemberCounts::default());
    }
}
