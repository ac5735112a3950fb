//! Rooms: the room graph in storage and the one ingest path every event takes (architecture
//! invariant 1). Client-facing room APIs build on this.

mod client;
mod history;
mod ingest;
mod local_events;
mod receipts;
mod state_store;
mod sync;
mod timestamps;
pub(crate) mod typing;

#[cfg(test)]
mod tests;

pub use client::{CreateRoom, DEFAULT_ROOM_VERSION, Preset, Txn};
pub use history::{DEFAULT_CONTEXT_LIMIT, RoomEventFilter};
pub use ingest::{Ingested, Outcome};
pub use local_events::LocalEvent;
pub use sync::{MAX_SYNC_TIMEOUT, MAX_TIMELINE_LIMIT, SyncRequest, parse_token};
pub use timestamps::EventAtTime;
pub use typing::MAX_TYPING_TIMEOUT;
