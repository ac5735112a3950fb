//! The application, as domain services on top of `lattice-storage`. Business rules live here;
//! HTTP and RocksDB do not.
//!
//! Each domain service owns its tables and reaches the store through a
//! [`ScopedStore`](lattice_storage::ScopedStore) that refuses every other table:
//! [`Accounts`] (users, UIA, registration tokens, devices, sessions, profiles),
//! [`AccountData`] (account data, tags, filters), [`ToDevice`] (device inboxes), [`Reports`],
//! and [`Rooms`] (the room graph, state, timelines, receipts, typing, relations, aliases, the
//! directory, and `/sync`, which also reads account data and inboxes). [`Service`] composes them: it builds them in
//! [`Service::new`], runs the rules that span several (a room's account data needs a
//! membership; a device's deletion clears its inbox in the same batch), and hands out each one.

pub mod account_data;
pub mod accounts;
mod clock;
mod composed;
mod error;
mod notifier;
pub mod push;
mod reports;
pub mod rooms;
mod secrets;
pub mod to_device;

use std::sync::Arc;

use lattice_storage::{KvStore, StreamPositions, WriteBatch};
use ruma::signatures::Ed25519KeyPair;
use ruma::{OwnedServerName, ServerName};

pub use account_data::{AccountData, FilterId};
pub use accounts::{
    Accounts, DeviceInfo, LoginRequest, LoginResult, NewAccount, Profile, ProfileField, RegisterRequest, Registered,
    RegistrationTokenInfo, Session, SessionTokens, UiaChallenge, valid_registration_token_format,
};
pub use clock::{Clock, SystemClock};
pub use error::ServiceError;
pub use lattice_storage::records::JsonObject;
pub use notifier::SyncWaiters;
pub use push::Push;
pub use reports::{Report, Reports};
pub use rooms::Rooms;
pub use secrets::PasswordHasher;
pub use to_device::{MAX_TO_DEVICE_PER_SYNC, ToDevice, ToDeviceMessages};

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
    /// Pushers may name `http://` push gateways (else only `https://`).
    pub push_allow_insecure_gateways: bool,
}

/// Seven days, as Synapse keeps redacted content by default.
pub const DEFAULT_REDACTION_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// The application: the domain services, composed. Each request reaches the service it needs
/// through an accessor, or one of the composed operations (`composed.rs`, `reports.rs`) when a
/// rule spans several services.
pub struct Service {
    config: ServiceConfig,
    /// The whole store: only for writes composed from several services' parts (see
    /// [`Service::commit_composed`]) and for flushing.
    store: Arc<dyn KvStore>,
    accounts: Arc<Accounts>,
    account_data: Arc<AccountData>,
    to_device: Arc<ToDevice>,
    reports: Reports,
    rooms: Rooms,
    push: Arc<Push>,
    notifier: Arc<notifier::Notifier>,
}

impl Service {
    pub fn new(
        config: ServiceConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        hasher: PasswordHasher,
        signing_key: Arc<Ed25519KeyPair>,
    ) -> Self {
        // Each stream `/sync` reads has its own positions. `stream` (events) is the stream all
        // writers shared before; the others start above it, so positions in tokens and rows
        // written before the split stay below theirs.
        let streams = rooms::RoomStreams {
            events: StreamPositions::new(kv.clone(), "stream"),
            receipts: StreamPositions::above(kv.clone(), "stream.receipts", "stream"),
            typing: StreamPositions::above(kv.clone(), "stream.typing", "stream"),
        };
        let account_data_stream = StreamPositions::above(kv.clone(), "stream.account_data", "stream");
        let to_device_stream = StreamPositions::above(kv.clone(), "stream.to_device", "stream");
        let notifier: Arc<notifier::Notifier> = Default::default();
        let accounts = Arc::new(Accounts::new(config.clone(), kv.clone(), clock.clone(), hasher));
        let account_data = Arc::new(AccountData::new(kv.clone(), account_data_stream, notifier.clone()));
        let to_device = Arc::new(ToDevice::new(kv.clone(), to_device_stream, notifier.clone()));
        let push =
            Arc::new(Push::new(kv.clone(), account_data.clone(), clock.clone(), config.push_allow_insecure_gateways));
        let neighbours = rooms::Neighbours {
            accounts: accounts.clone(),
            account_data: account_data.clone(),
            to_device: to_device.clone(),
            push: push.clone(),
        };
        let rooms =
            Rooms::new(config.clone(), kv.clone(), clock.clone(), signing_key, streams, notifier.clone(), neighbours);
        Self {
            config,
            push,
            reports: Reports::new(kv.clone(), clock),
            store: kv,
            accounts,
            account_data,
            to_device,
            rooms,
            notifier,
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
        Ok(self.store.flush().await?)
    }

    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    pub fn account_data(&self) -> &AccountData {
        &self.account_data
    }

    pub fn to_device(&self) -> &ToDevice {
        &self.to_device
    }

    pub fn reports(&self) -> &Reports {
        &self.reports
    }

    pub fn rooms(&self) -> &Rooms {
        &self.rooms
    }

    pub fn push(&self) -> &Push {
        &self.push
    }

    /// Commits a batch that several services filled, each with rows of its own tables only
    /// (through their `…_to_batch` methods), so a change that spans them stays atomic.
    async fn commit_composed(&self, batch: WriteBatch) -> Result<(), lattice_storage::StorageError> {
        self.store.write(batch).await
    }
}

#[cfg(test)]
mod tests;

/// The configuration the unit tests build their services with, for the server `name`.
#[cfg(test)]
fn test_config(name: &str) -> ServiceConfig {
    ServiceConfig {
        server_name: name.try_into().expect("a valid test server name"),
        registration: RegistrationMode::Token,
        refreshable_token_lifetime_ms: 60_000,
        default_room_version: "11".into(),
        public_rooms_cache_ms: 0,
        redaction_retention_ms: DEFAULT_REDACTION_RETENTION_MS,
        push_allow_insecure_gateways: false,
    }
}

#[cfg(test)]
fn test_signing_key() -> Arc<Ed25519KeyPair> {
    Arc::new(Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "test".into()).expect("generated key parses"))
}
