//! The room's history in the order of its graph (`topological` table): by depth, then by the
//! event's `order` (its stream position, or for backfilled history a value from the same
//! counter). `/sync` follows the arrival order in `timeline`; `/messages` and `/context` this one.

use lattice_core::event::Pdu;
use lattice_storage::{Table, WriteBatch, keys};
use ruma::RoomId;

/// The depth as the index sorts it: negative or absurd values cannot occur (`depth` is a
/// `UInt`), so this is the PDU's own depth.
pub(super) fn depth_of(event: &Pdu) -> u64 {
    u64::from(event.depth())
}

/// Adds the event's row to `batch`.
pub(super) fn index_event(batch: &mut WriteBatch, room_id: &RoomId, event: &Pdu, order: u64) {
    batch.put(
        Table::Topological,
        keys::topological(room_id.as_str(), depth_of(event), order),
        event.id().as_str().as_bytes().to_vec(),
    );
}
