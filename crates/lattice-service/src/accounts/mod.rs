//! The accounts service: users, passwords, user-interactive auth, registration tokens,
//! devices and their sessions, and profiles. It owns those tables and nothing else; what an
//! account change means for rooms or device inboxes is composed by [`Service`](crate::Service).

pub(crate) mod dehydrated;
mod devices;
mod profile;
mod registration;
mod registration_tokens;
mod sessions;
mod uia;

use std::sync::Arc;

use lattice_storage::{KvStore, ScopedStore, Table, TableScope};
use ruma::ServerName;

pub use dehydrated::DehydratedDevice;
pub use devices::DeviceInfo;
pub(crate) use devices::MAX_DEVICES_PER_DELETE;
pub(crate) use profile::profile_content;
pub use profile::{Profile, ProfileField};
pub use registration::{NewAccount, RegisterRequest, Registered};
pub(crate) use registration::{PASSWORD_FLOWS, check_password_length};
pub use registration_tokens::{RegistrationTokenInfo, valid_registration_token_format};
pub use sessions::{LoginRequest, LoginResult, Session, SessionTokens};
pub(crate) use uia::Purpose;
pub use uia::UiaChallenge;

use crate::{Clock, PasswordHasher, ServiceConfig};

pub(crate) const TABLES: TableScope = TableScope {
    owner: "accounts",
    tables: &[
        Table::Users,
        Table::Profiles,
        Table::Devices,
        Table::AccessTokens,
        Table::RefreshTokens,
        Table::RegistrationTokens,
        Table::UiaSessions,
        Table::DehydratedDevices,
    ],
};

pub struct Accounts {
    config: ServiceConfig,
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
    hasher: PasswordHasher,
    /// Held while an account that spends a registration token is written: every such write
    /// reads and rewrites the token's use count, so concurrent ones (a group handed one token)
    /// would otherwise conflict and retry until some gave up. Passwords are hashed before it.
    token_spending: tokio::sync::Mutex<()>,
}

impl Accounts {
    pub(crate) fn new(
        config: ServiceConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        hasher: PasswordHasher,
    ) -> Self {
        Self { config, kv: ScopedStore::new(kv, TABLES), clock, hasher, token_spending: tokio::sync::Mutex::new(()) }
    }

    fn server_name(&self) -> &ServerName {
        &self.config.server_name
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}
