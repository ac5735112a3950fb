//! The end-to-end encryption service: the keys clients publish so others can encrypt to them,
//! and the server-side key backup. The server never sees plaintext; it stores and routes keys
//! exactly, checks what it can check (who may publish which key, the signatures a key must
//! carry) and records every change of a user's device list in its own stream, so `/sync` and
//! `/keys/changes` can tell exactly the users who share a room with that user.
//!
//! `keys.rs` — device keys, one-time and fallback keys (`/keys/upload`, `/keys/query`,
//! `/keys/claim`); `cross_signing.rs` — cross-signing keys and signatures; `device_lists.rs` —
//! the device-list stream; `remote_lists.rs` — the cache of other servers' users' device lists;
//! `backup.rs` — `/room_keys`; `signed.rs` — the pure checks of signed
//! JSON objects. It owns the tables below and knows nothing of rooms: the composed operations
//! in `composed.rs` ask the rooms service who shares a room with whom.

mod backup;
mod cross_signing;
mod device_lists;
mod keys;
mod remote_lists;
mod signed;

use std::sync::Arc;

use lattice_storage::{KvStore, ScopedStore, StreamPositions, Table, TableScope};

pub use backup::{BackupInfo, BackupKeys, BackupWrite};
pub use cross_signing::{CrossSigningUpload, SignatureFailure};
pub use device_lists::{DeviceListChange, ListUpdate, PublishedChange};
pub use keys::{ClaimedKeys, KeyCounts, QueriedKeys, UploadKeys};
pub(crate) use remote_lists::checked_cross_signing_key;
pub use remote_lists::{Applied, RemoteDeviceUpdate, RemoteSnapshot};

pub(crate) const TABLES: TableScope = TableScope {
    owner: "e2ee",
    tables: &[
        Table::DeviceKeys,
        Table::OneTimeKeys,
        Table::FallbackKeys,
        Table::CrossSigningKeys,
        Table::KeySignatures,
        Table::DeviceListChanges,
        Table::DeviceListLatest,
        Table::RemoteDeviceLists,
        Table::RemoteDevices,
        Table::BackupVersions,
        Table::BackupKeys,
        Table::Counters,
    ],
};

/// How often a write that lost a race (a key claimed, a backup changed by another request) is
/// tried again.
const WRITE_RETRIES: usize = 16;

pub struct E2ee {
    kv: Arc<dyn KvStore>,
    /// The device-list stream (`stream.device_lists`): one position per change of one or more
    /// users' device lists.
    device_lists: StreamPositions,
}

impl E2ee {
    pub(crate) fn new(kv: Arc<dyn KvStore>, device_lists: StreamPositions) -> Self {
        Self { kv: ScopedStore::new(kv, TABLES), device_lists }
    }
}

/// Device IDs and key IDs become parts of keys joined by NUL: one that holds a NUL, or is
/// empty or oversized, is refused before anything is read.
fn check_key_part(what: &str, part: &str) -> Result<(), crate::ServiceError> {
    if part.is_empty() || part.len() > lattice_core::limits::MAX_DEVICE_ID_BYTES || part.contains('\0') {
        return Err(crate::ServiceError::InvalidParam(format!("invalid {what} {part:?}")));
    }
    Ok(())
}
