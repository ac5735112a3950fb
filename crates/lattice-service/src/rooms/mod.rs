//! Rooms: the room graph in storage and the one ingest path every event takes (architecture
//! invariant 1). Client-facing room APIs build on this.

mod aliases;
mod client;
mod directory;
mod filter;
mod front;
mod graph;
mod history;
mod ingest;
mod local_events;
mod membership;
mod merge;
mod migrations;
mod receipts;
mod redactions;
mod relations;
mod state_store;
mod sync;
mod timestamps;
mod topological;
pub(crate) mod typing;
mod upgrade;
mod visibility;

#[cfg(test)]
mod history_order_tests;
#[cfg(test)]
mod remote_tests;
#[cfg(test)]
mod tests;

pub use aliases::MAX_ALIASES_PER_ROOM;
pub use client::{CreateRoom, DEFAULT_ROOM_VERSION, Preset, Txn};
pub(crate) use directory::DirectoryCache;
pub use directory::{MAX_PUBLIC_ROOMS_LIMIT, PublicRoomsPage, PublicRoomsQuery};
pub use filter::{EventFilter, SyncFilter};
pub use history::DEFAULT_CONTEXT_LIMIT;
pub use ingest::{Arrival, Ingested, Outcome};
pub use local_events::LocalEvent;
pub use membership::member_content;
pub(crate) use merge::MergeQueue;
pub use migrations::schema_migrations;
pub use relations::RelationsQuery;
pub use sync::{MAX_SYNC_TIMEOUT, MAX_TIMELINE_LIMIT, SyncRequest, SyncToken, parse_token};
pub use timestamps::EventAtTime;
pub use topological::{HistoryGap, HistoryPage, HistoryToken, TopoPos};
pub use typing::MAX_TYPING_TIMEOUT;
pub use upgrade::UpgradeRoom;
