//! The application: accounts, devices, sessions, profiles and per-user data, on top of
//! `lattice-storage`. Business rules live here; HTTP and RocksDB do not.

mod account_data;
mod accounts;
mod clock;
mod devices;
mod error;
mod notifier;
mod profile;
mod registration_tokens;
mod reports;
pub mod rooms;
mod secrets;
mod sessions;
mod tags;
mod to_device;
mod uia;

use std::sync::Arc;

use lattice_storage::KvStore;
use ruma::signatures::Ed25519KeyPair;
use ruma::{OwnedServerName, ServerName};

pub use account_data::FilterId;
pub use accounts::{NewAccount, RegisterRequest, Registered};
pub use clock::{Clock, SystemClock};
pub use devices::DeviceInfo;
pub use error::ServiceError;
pub use lattice_storage::records::JsonObject;
pub use notifier::SyncWaiters;
pub use profile::Profile;
pub use profile::ProfileField;
pub use registration_tokens::{RegistrationTokenInfo, valid_registration_token_format};
pub use reports::Report;
pub use secrets::PasswordHasher;
pub use sessions::{LoginRequest, LoginResult, Session, SessionTokens};
pub use to_device::{MAX_TO_DEVICE_PER_SYNC, ToDeviceMessages};
pub use uia::UiaChallenge;

/// Who may create accounts through the client API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistrationMode {
    /// Nobody; accounts are made with `lattice user create`.
    Disabled,
    /// Anyone holding a registration token (the default).
    Token,
    /// Anyone at all, after a dummy stage; a token still works too.
    Open,
}

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub server_name: OwnedServerName,
    pub registration: RegistrationMode,
    /// Lifetime of access tokens issued together with a refresh token.
    pub refreshable_token_lifetime_ms: u64,
    /// The room version `createRoom` uses when the client names none (one of 1–12).
    pub default_room_version: String,
    /// How long the sorted public room directory is reused before it is read again.
    pub public_rooms_cache_ms: u64,
    /// How long the original of a redacted event stays readable to server admins; 0 keeps none.
    pub redaction_retention_ms: u64,
}

/// Seven days, as Synapse keeps redacted content by default.
pub const DEFAULT_REDACTION_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// The application state shared by every request.
pub struct Service {
    config: ServiceConfig,
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
    hasher: PasswordHasher,
    /// Signs the events this server creates (and, later, its federation requests).
    signing_key: Arc<Ed25519KeyPair>,
    /// Striped per-room locks: a fast path that keeps concurrent writers of one room from
    /// retrying against each other. Correctness comes from the batches' conditions, not these.
    room_locks: Vec<tokio::sync::Mutex<()>>,
    /// Hands out stream positions without a lock across the writes that use them; `/sync` reads
    /// up to its completed mark. A writer takes a position after any room lock it needs (never
    /// the other way round) and publishes it before it wakes anyone.
    stream: lattice_storage::StreamPositions,
    /// State group IDs, from reserved blocks like stream positions, so a state event's group is
    /// written only in the event's own batch.
    state_group_ids: lattice_storage::StreamPositions,
    /// Who is typing where; in memory only, since notices last seconds.
    typing: std::sync::Mutex<rooms::typing::Typing>,
    /// Wakes each waiting `/sync` only for writes that concern its user.
    notifier: Arc<notifier::Notifier>,
    /// The public room directory as last listed.
    directory_cache: rooms::DirectoryCache,
    /// Rooms whose forward extremities are waiting to be merged.
    merges: rooms::MergeQueue,
}

/// How many room locks there are; rooms share a lock when their IDs hash alike.
const ROOM_LOCK_STRIPES: usize = 64;

impl Service {
    pub fn new(
        config: ServiceConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        hasher: PasswordHasher,
        signing_key: Arc<Ed25519KeyPair>,
    ) -> Self {
        let room_locks = (0..ROOM_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        let stream = lattice_storage::StreamPositions::new(kv.clone(), "stream");
        let state_group_ids = lattice_storage::StreamPositions::new(kv.clone(), "state_group");
        Self {
            config,
            kv,
            clock,
            hasher,
            signing_key,
            room_locks,
            stream,
            state_group_ids,
            typing: Default::default(),
            notifier: Default::default(),
            directory_cache: Default::default(),
            merges: Default::default(),
        }
    }

    /// The number of `/sync` requests waiting for news, readable after the service is gone.
    pub fn sync_waiters(&self) -> SyncWaiters {
        SyncWaiters(self.notifier.clone())
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    pub fn server_name(&self) -> &ServerName {
        &self.config.server_name
    }

    /// Makes every acknowledged write durable; called at shutdown.
    pub async fn flush(&self) -> Result<(), ServiceError> {
        Ok(self.kv.flush().await?)
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

#[cfg(test)]
mod tests;

#[cfg(test)]
fn test_signing_key() -> Arc<Ed25519KeyPair> {
    Arc::new(Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "test".into()).expect("generated key parses"))
}
