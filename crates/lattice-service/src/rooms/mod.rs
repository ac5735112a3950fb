//! The rooms service: the room graph in storage and the one ingest path every event takes
//! (architecture invariant 1), and the client-facing room APIs built on it — state, timelines,
//! memberships, receipts, typing, relations, aliases, the directory and `/messages`, and the
//! reads the sync service (`crate::sync`) asks of its tables (`sync_reads.rs`). It owns the room
//! tables ([`TABLES`]) and asks the other services through their typed APIs.

mod aliases;
mod client;
mod deferred;
mod directory;
mod filter;
mod front;
mod graph;
mod history;
mod ingest;
mod local_events;
mod membership;
mod merge;
mod messages;
mod migrations;
mod out_of_band;
mod parsed_events;
mod peers;
mod push_events;
mod receipts;
mod redactions;
mod relations;
mod search;
mod spaces;
mod state_store;
mod sync_reads;
mod timestamps;
mod topological;
pub(crate) mod typing;
mod upgrade;
mod user_directory;
mod visibility;

use std::sync::Arc;

use lattice_storage::{KvStore, ScopedStore, StreamPositions, Table, TableScope};
use ruma::ServerName;
use ruma::signatures::Ed25519KeyPair;

use crate::account_data::AccountData;
use crate::accounts::Accounts;
use crate::notifier::Notifier;
use crate::push::Push;
use crate::{Clock, ServiceConfig};

#[cfg(test)]
mod history_order_tests;
#[cfg(test)]
mod remote_tests;
#[cfg(test)]
mod tests;

pub use aliases::MAX_ALIASES_PER_ROOM;
pub use client::{CreateRoom, DEFAULT_ROOM_VERSION, Preset, Txn};
pub(crate) use deferred::with_deferred_durability;
pub(crate) use directory::DirectoryCache;
pub use directory::{MAX_PUBLIC_ROOMS_LIMIT, PublicRoomsPage, PublicRoomsQuery};
pub use filter::{EventFilter, SyncFilter};
pub use history::DEFAULT_CONTEXT_LIMIT;
pub use ingest::{Arrival, Ingested, Outcome, check_remote_object};
pub(crate) use ingest::{membership_of as membership_of_pdu, room_id_of as room_id_of_pdu};
pub use local_events::LocalEvent;
pub use membership::member_content;
pub(crate) use merge::MergeQueue;
pub use messages::MAX_TIMELINE_LIMIT;
pub(crate) use messages::{MAX_FILTERED_SCAN, visible};
pub use migrations::schema_migrations;
pub use peers::OwedEvent;
pub(crate) use peers::referenced_ids;
pub use relations::RelationsQuery;
pub use search::{MAX_SEARCH_LIMIT, SearchCriteria, SearchOrder};
pub use spaces::{SpaceChild, children_of};
pub use timestamps::EventAtTime;
pub(crate) use topological::history_position;
pub use topological::{HistoryGap, HistoryPage, HistoryToken, TopoPos};
pub use typing::MAX_TYPING_TIMEOUT;
pub use upgrade::UpgradeRoom;
pub use user_directory::{DirectoryPage, DirectoryUser, MAX_DIRECTORY_LIMIT};
pub(crate) use visibility::{MAX_HIDDEN_RUN, Viewer};

/// The room tables. `counters` holds the stream and state-group reservations.
const ROOM_TABLES: [Table; 26] = [
    Table::Counters,
    Table::Rooms,
    Table::Events,
    Table::Timeline,
    Table::StateGroups,
    Table::CurrentState,
    Table::Memberships,
    Table::PendingRedactions,
    Table::Transactions,
    Table::Receipts,
    Table::ReceiptPositions,
    Table::Relations,
    Table::Threads,
    Table::ThreadActivity,
    Table::ForgottenRooms,
    Table::RoomAliases,
    Table::RoomAliasIndex,
    Table::PublicRooms,
    Table::EventTimestamps,
    Table::RedactedOriginals,
    Table::RedactedOriginalsByTime,
    Table::Topological,
    Table::BackwardExtremities,
    Table::RoomActivity,
    Table::OutOfBandMemberships,
    Table::SearchWords,
];

pub(crate) const TABLES: TableScope = TableScope { owner: "rooms", tables: &ROOM_TABLES };

/// The push service's rows an event's batch carries (see `EVENT_WRITES`): what the event
/// notified, and for a local user's join or leave, their read marker at it
/// (`Push::joined_room_into`, `Push::left_room_into`).
const PUSH_ROWS_OF_AN_EVENT: [Table; 6] = [
    Table::PushEvents,
    Table::PushNotifications,
    Table::PushUnread,
    Table::PushRoomNotifications,
    Table::PushQueue,
    Table::PushReadMarkers,
];

/// The room tables followed by the push rows of an event.
const EVENT_WRITE_TABLES: [Table; ROOM_TABLES.len() + PUSH_ROWS_OF_AN_EVENT.len()] = {
    let mut all = [Table::Counters; ROOM_TABLES.len() + PUSH_ROWS_OF_AN_EVENT.len()];
    let mut i = 0;
    while i < ROOM_TABLES.len() {
        all[i] = ROOM_TABLES[i];
        i += 1;
    }
    let mut j = 0;
    while j < PUSH_ROWS_OF_AN_EVENT.len() {
        all[ROOM_TABLES.len() + j] = PUSH_ROWS_OF_AN_EVENT[j];
        j += 1;
    }
    all
};

/// What an event's batch may write: the room tables, and the notifications and pushes the
/// push service adds to it (`Push::notifications_into`), so that an event and what it notified
/// are one write. Not an owner: the push tables stay the push service's.
const EVENT_WRITES: TableScope =
    TableScope { owner: "rooms, with the push rows of an event", tables: &EVENT_WRITE_TABLES };

/// How many room locks there are; rooms share a lock when their IDs hash alike.
const ROOM_LOCK_STRIPES: usize = 64;

/// The streams `/sync` reads that the rooms service writes: each has its own positions, so a
/// write to one never holds back what another shows.
pub(crate) struct RoomStreams {
    /// Timeline events (`stream`, the stream all writers shared before the split).
    pub events: StreamPositions,
    /// Read receipts (`stream.receipts`).
    pub receipts: StreamPositions,
    /// Typing notices (`stream.typing`), kept in memory and stamped with these positions.
    pub typing: StreamPositions,
}

/// The services the rooms service reads (and, for `m.fully_read`, writes) through their APIs.
pub(crate) struct Neighbours {
    pub accounts: Arc<Accounts>,
    pub account_data: Arc<AccountData>,
    /// Evaluates push rules for each live event and keeps the unread counts.
    pub push: Arc<Push>,
}

pub struct Rooms {
    config: ServiceConfig,
    kv: Arc<dyn KvStore>,
    /// Writes an event's batch, which may carry the push rows it raised (see `EVENT_WRITES`).
    event_writes: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
    /// Signs the events this server creates (and, later, its federation requests).
    signing_key: Arc<Ed25519KeyPair>,
    accounts: Arc<Accounts>,
    account_data: Arc<AccountData>,
    push: Arc<Push>,
    /// Striped per-room locks: a fast path that keeps concurrent writers of one room from
    /// retrying against each other. Correctness comes from the batches' conditions, not these.
    room_locks: Vec<tokio::sync::Mutex<()>>,
    /// Hands out event positions without a lock across the writes that use them; `/sync` reads
    /// up to its completed mark. A writer takes a position after any room lock it needs (never
    /// the other way round) and publishes it before it wakes anyone.
    stream: StreamPositions,
    /// Receipt positions, taken and published the same way.
    receipts_stream: StreamPositions,
    /// Typing positions: a stamp per change of a room's typing users.
    typing_stream: StreamPositions,
    /// State group IDs, from reserved blocks like stream positions, so a state event's group is
    /// written only in the event's own batch.
    state_group_ids: StreamPositions,
    /// Who is typing where; in memory only, since notices last seconds.
    typing: std::sync::Mutex<typing::Typing>,
    /// Wakes each waiting `/sync` only for writes that concern its user.
    notifier: Arc<Notifier>,
    /// The public room directory as last listed.
    directory_cache: DirectoryCache,
    /// Rooms whose forward extremities are waiting to be merged.
    merges: MergeQueue,
    /// What push rules need of each room at its current state (`push_events.rs`).
    push_facts: push_events::PushFactsCache,
    /// Woken after every live event, for the federation forwarder (which reads what is new
    /// from the stream itself, so one wake-up may cover many events).
    events_written: Arc<tokio::sync::Notify>,
    /// Stored events kept parsed for the auth checks of the events citing them.
    parsed_events: parsed_events::ParsedEvents,
    /// Each room's joined servers as of its current state group (`peers.rs`).
    joined_servers_cache: peers::JoinedServersCache,
}

impl Rooms {
    pub(crate) fn new(
        config: ServiceConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        signing_key: Arc<Ed25519KeyPair>,
        streams: RoomStreams,
        notifier: Arc<Notifier>,
        neighbours: Neighbours,
    ) -> Self {
        let Neighbours { accounts, account_data, push } = neighbours;
        let RoomStreams { events: stream, receipts: receipts_stream, typing: typing_stream } = streams;
        Self {
            config,
            state_group_ids: StreamPositions::new(kv.clone(), "state_group"),
            event_writes: ScopedStore::new(kv.clone(), EVENT_WRITES),
            kv: ScopedStore::new(kv, TABLES),
            clock,
            signing_key,
            accounts,
            account_data,
            push,
            room_locks: (0..ROOM_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            stream,
            receipts_stream,
            typing_stream,
            typing: Default::default(),
            notifier,
            directory_cache: Default::default(),
            merges: Default::default(),
            push_facts: Default::default(),
            events_written: Default::default(),
            parsed_events: Default::default(),
            joined_servers_cache: Default::default(),
        }
    }

    /// The service clock's now, in milliseconds.
    pub fn now_millis(&self) -> u64 {
        self.now_ms()
    }

    /// Notified after live events are written (see `events_written`).
    pub fn events_written(&self) -> Arc<tokio::sync::Notify> {
        self.events_written.clone()
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    pub fn server_name(&self) -> &ServerName {
        &self.config.server_name
    }

    /// The lock stripe of a room (see `room_locks`).
    fn room_lock(&self, room_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        room_id.hash(&mut hasher);
        &self.room_locks[(hasher.finish() as usize) % ROOM_LOCK_STRIPES]
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}
