//! The application, as domain services on top of `lattice-storage`. Business rules live here;
//! HTTP and RocksDB do not.
//!
//! Each domain service owns its tables and reaches the store through a
//! [`ScopedStore`](lattice_storage::ScopedStore) that refuses every other table:
//! [`Accounts`] (users, UIA, registration tokens, devices, sessions, profiles),
//! [`AccountData`] (account data, tags, filters), [`ToDevice`] (device inboxes), [`Reports`],
//! [`Rooms`] (the room graph, state, timelines, receipts, typing, relations, aliases, the
//! directory, `/messages`), [`Presence`] (who is online, in memory, with changes kept), [`DelayedEvents`] (events
//! scheduled to be sent later, MSC4140), and [`Sync`] (`/sync`, which owns no table and reads rooms, account
//! data and inboxes through their APIs). [`Service`] composes them: it builds them in
//! [`Service::new`], runs the rules that span several (a room's account data needs a
//! membership; a device's deletion clears its inbox in the same batch), and hands out each one.

pub mod account_data;
pub mod accounts;
mod calls;
mod clock;
mod composed;
mod composed_dehydrated;
mod composed_keys;
mod composed_presence;
pub mod delayed_events;
pub mod e2ee;
mod error;
pub mod federation;
pub mod media;
mod notifier;
pub mod presence;
pub mod push;
mod reports;
pub mod rooms;
mod secrets;
pub mod sync;
pub mod to_device;
mod user_cache;

use std::sync::Arc;

use lattice_storage::{KvStore, StreamPositions, WriteBatch};
use ruma::signatures::Ed25519KeyPair;
use ruma::{OwnedServerName, ServerName};

pub use account_data::{AccountData, FilterId};
pub use accounts::{
    Accounts, DeviceInfo, LoginRequest, LoginResult, NewAccount, Profile, ProfileField, RegisterRequest, Registered,
    RegistrationTokenInfo, Session, SessionTokens, UiaChallenge, valid_registration_token_format,
};
pub use calls::{TurnConfig, TurnCredentials, TurnServer};
pub use clock::{Clock, SystemClock};
pub use composed_dehydrated::NewDehydratedDevice;
pub use composed_keys::KeyFailures;
pub use delayed_events::{DelayedEvents, DelayedEventsConfig};
pub use e2ee::E2ee;
pub use error::ServiceError;
pub use federation::Federation;
pub use lattice_storage::records::JsonObject;
pub use media::{Media, MediaConfig, MediaFile, S3Config, UrlPreviewConfig};
pub use notifier::SyncWaiters;
pub use presence::{Presence, PresenceConfig};
pub use push::Push;
pub use reports::{Report, Reports};
pub use rooms::Rooms;
pub use secrets::PasswordHasher;
pub use sync::Sync;
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
    /// `counts.unread` of pushes counts unread notifying events rather than rooms with any.
    pub push_badge_counts_messages: bool,
    /// The user directory finds every active local user, not only those sharing a room with
    /// the searcher or joined to a public room.
    pub user_directory_search_all_users: bool,
    /// The TURN server `GET /voip/turnServer` hands out credentials for; `None`: none.
    pub turn: Option<TurnConfig>,
    /// Uploads, downloads, thumbnails and remote media (issue #14).
    pub media: MediaConfig,
    /// Whether presence is tracked, and its timeouts (issue #12).
    pub presence: PresenceConfig,
    /// Delayed events (MSC4140): on or off, and their limits.
    pub delayed_events: DelayedEventsConfig,
}

/// How many gaps one `/messages` request backfills at most before answering.
pub const MAX_BACKFILLS_PER_PAGE: usize = 3;

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
    e2ee: Arc<E2ee>,
    reports: Reports,
    rooms: Arc<Rooms>,
    push: Arc<Push>,
    federation: Federation,
    media: Arc<Media>,
    presence: Arc<Presence>,
    delayed_events: Arc<DelayedEvents>,
    sync: Sync,
    notifier: Arc<notifier::Notifier>,
    /// For what the composition itself stamps (TURN credentials).
    clock: Arc<dyn Clock>,
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
        let device_list_stream = StreamPositions::above(kv.clone(), "stream.device_lists", "stream");
        let presence_stream = StreamPositions::above(kv.clone(), "stream.presence", "stream");
        let notifier: Arc<notifier::Notifier> = Default::default();
        let accounts = Arc::new(Accounts::new(config.clone(), kv.clone(), clock.clone(), hasher));
        let account_data = Arc::new(AccountData::new(kv.clone(), account_data_stream, notifier.clone()));
        let to_device = Arc::new(ToDevice::new(kv.clone(), to_device_stream, notifier.clone()));
        let e2ee = Arc::new(E2ee::new(kv.clone(), device_list_stream));
        let push = Arc::new(Push::new(
            kv.clone(),
            account_data.clone(),
            clock.clone(),
            config.push_allow_insecure_gateways,
            config.push_badge_counts_messages,
        ));
        let neighbours =
            rooms::Neighbours { accounts: accounts.clone(), account_data: account_data.clone(), push: push.clone() };
        let rooms = Arc::new(Rooms::new(
            config.clone(),
            kv.clone(),
            clock.clone(),
            signing_key,
            streams,
            notifier.clone(),
            neighbours,
        ));
        let presence = Arc::new(Presence::new(
            config.presence,
            kv.clone(),
            clock.clone(),
            presence_stream,
            notifier.clone(),
            rooms.clone(),
        ));
        let sync = Sync::new(
            rooms.clone(),
            account_data.clone(),
            to_device.clone(),
            e2ee.clone(),
            push.clone(),
            presence.clone(),
            notifier.clone(),
        );
        let federation = Federation::new(
            kv.clone(),
            rooms.clone(),
            federation::FederationNeighbours {
                accounts: accounts.clone(),
                e2ee: e2ee.clone(),
                to_device: to_device.clone(),
                presence: presence.clone(),
                notifier: notifier.clone(),
            },
        );
        let media = Arc::new(Media::new(config.media.clone(), kv.clone(), clock.clone(), config.server_name.clone()));
        let delayed_events =
            Arc::new(DelayedEvents::new(config.delayed_events.clone(), kv.clone(), clock.clone(), rooms.clone()));
        Self {
            delayed_events,
            media,
            config,
            push,
            reports: Reports::new(kv.clone(), clock.clone()),
            clock,
            store: kv,
            accounts,
            account_data,
            to_device,
            e2ee,
            rooms,
            federation,
            presence,
            sync,
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

    /// `POST /user_directory/search`: the users `searcher` may find (see
    /// `rooms/user_directory.rs`), with every local user when the server is configured so.
    pub async fn search_user_directory(
        &self,
        searcher: &ruma::UserId,
        term: &str,
        limit: Option<usize>,
    ) -> Result<rooms::DirectoryPage, ServiceError> {
        self.rooms.search_user_directory(searcher, term, limit, self.config.user_directory_search_all_users).await
    }

    pub fn rooms(&self) -> &Rooms {
        &self.rooms
    }

    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    pub fn media(&self) -> &Media {
        &self.media
    }

    /// The room an alias names and servers to join it through: a local alias from this
    /// server's directory (with the servers in the room, this one first), another server's
    /// alias by asking that server (`/query/directory`) when federation is on.
    pub async fn resolve_alias(
        &self,
        alias: &ruma::RoomAliasId,
    ) -> Result<(ruma::OwnedRoomId, Vec<OwnedServerName>), ServiceError> {
        if alias.server_name() == self.server_name() {
            let room_id = self.rooms.resolve_alias(alias).await?;
            let mut servers: Vec<OwnedServerName> = match self.rooms.joined_servers(&room_id).await {
                Ok(servers) => servers.into_iter().filter(|s| s != self.server_name()).collect(),
                Err(_) => Vec::new(),
            };
            servers.insert(0, self.server_name().to_owned());
            return Ok((room_id, servers));
        }
        if !self.federation.is_enabled() {
            return Err(ServiceError::NotFound(format!("{alias} is another server's alias, and federation is off")));
        }
        self.federation.query_remote_alias(alias).await
    }

    /// `GET /rooms/{roomId}/messages`: a page of history; when a backward page reaches a gap
    /// (history this server never received, e.g. from before it joined), the gap is backfilled
    /// from another server in the room and the page is read again, up to
    /// [`MAX_BACKFILLS_PER_PAGE`] times (a forked history has a gap on each branch). A gap left
    /// is reported again by the next page (see [`rooms::Rooms::messages`]).
    pub async fn messages(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        range: (Option<rooms::HistoryToken>, Option<rooms::HistoryToken>),
        backward: bool,
        limit: usize,
        filter: &rooms::EventFilter,
    ) -> Result<rooms::HistoryPage, ServiceError> {
        let mut page = self.rooms.messages(user_id, room_id, range, backward, limit, filter).await?;
        for _ in 0..MAX_BACKFILLS_PER_PAGE {
            let Some(gap) = page.gap.as_ref().filter(|_| self.federation.is_enabled()) else { break };
            match self.federation.backfill_gap(room_id, &gap.missing, limit.max(20)).await {
                Ok(0) => break,
                Ok(_) => page = self.rooms.messages(user_id, room_id, range, backward, limit, filter).await?,
                Err(error) => {
                    tracing::info!(%room_id, %error, "backfilling a gap in history failed");
                    break;
                }
            }
        }
        Ok(page)
    }

    /// `GET /rooms/{roomId}/timestamp_to_event`: the nearest event the user may see. With
    /// federation on, one of the room's other servers is asked too (history from before this
    /// server joined lives only there); when it names a nearer event this server lacks, that
    /// event is backfilled, checked like any other, and the local index answers again, so the
    /// answer is always a stored event the user may see.
    pub async fn timestamp_to_event(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        ts: u64,
        forward: bool,
    ) -> Result<rooms::EventAtTime, ServiceError> {
        let local = self.rooms.timestamp_to_event(user_id, room_id, ts, forward).await;
        if !self.federation.is_enabled() || !matches!(local, Ok(_) | Err(ServiceError::NotFound(_))) {
            return local;
        }
        let Some(remote) = self.federation.remote_timestamp_to_event(room_id, ts, forward).await else { return local };
        let nearer = local.as_ref().map_or(true, |found| remote.nearer_than(found, forward));
        if !nearer || self.rooms.event_record(&remote.event_id).await?.is_some() {
            return local;
        }
        match self.federation.backfill_gap(room_id, std::slice::from_ref(&remote.event_id), 1).await {
            Ok(0) => local,
            Ok(_) => self.rooms.timestamp_to_event(user_id, room_id, ts, forward).await,
            Err(error) => {
                tracing::info!(%room_id, %error, "fetching the event another server found by time failed");
                local
            }
        }
    }

    /// `PUT /typing`: the notice here, and to the room's other servers.
    pub async fn set_typing(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        typing: bool,
        timeout: std::time::Duration,
    ) -> Result<(), ServiceError> {
        self.rooms.set_typing(user_id, room_id, typing, timeout).await?;
        let edu = serde_json::json!({
            "edu_type": "m.typing",
            "content": { "room_id": room_id, "user_id": user_id, "typing": typing },
        });
        self.announce(room_id, &edu).await;
        Ok(())
    }

    /// `POST /receipt`: the receipt here, and a public read receipt to the room's other servers.
    pub async fn set_receipt(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        receipt_type: &str,
        event_id: &str,
        thread_id: Option<String>,
    ) -> Result<(), ServiceError> {
        self.rooms.set_receipt(user_id, room_id, receipt_type, event_id, thread_id.clone()).await?;
        if receipt_type == "m.read" {
            self.announce_read_receipt(user_id, room_id, event_id, thread_id).await;
        }
        Ok(())
    }

    /// Sends a public read receipt, already stored here, to the room's other servers.
    pub async fn announce_read_receipt(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        event_id: &str,
        thread_id: Option<String>,
    ) {
        {
            let mut data = serde_json::json!({ "ts": self.rooms.now_millis() });
            if let Some(thread) = thread_id {
                data["thread_id"] = serde_json::json!(thread);
            }
            let edu = serde_json::json!({
                "edu_type": "m.receipt",
                "content": { room_id.as_str(): { "m.read": { user_id.as_str(): { "event_ids": [event_id], "data": data } } } },
            });
            self.announce(room_id, &edu).await;
        }
    }

    /// Tells the room's other servers about an ephemeral change; a failure is logged, not the
    /// caller's: the change itself is made.
    async fn announce(&self, room_id: &ruma::RoomId, edu: &serde_json::Value) {
        if let Err(error) = self.federation.send_room_edu(room_id, edu).await {
            tracing::warn!(%room_id, %error, "queueing an EDU for other servers failed");
        }
    }

    /// `POST /createRoom`: the room, then the invites of other servers' users over federation
    /// (each needs the invitee's server to countersign). A refused invite fails the request,
    /// as the client asked for it, but the room stays.
    pub async fn create_room(
        &self,
        creator: &ruma::UserId,
        mut request: rooms::CreateRoom,
    ) -> Result<ruma::OwnedRoomId, ServiceError> {
        let remote: Vec<ruma::OwnedUserId> =
            request.invite.iter().filter(|user| user.server_name() != self.server_name()).cloned().collect();
        request.remote_invites_by_caller = self.federation.is_enabled();
        let is_direct = request.is_direct;
        let room_id = self.rooms.create_room(creator, request).await?;
        if self.federation.is_enabled() {
            for invitee in remote {
                let content = serde_json::json!({ "membership": "invite", "is_direct": is_direct });
                self.federation.invite_remote(creator, &room_id, &invitee, content).await?;
            }
        }
        Ok(room_id)
    }

    /// `POST /invite`: a user of this server is invited here; one of another server through
    /// that server (`/invite` v2), when federation is on.
    pub async fn invite(
        &self,
        sender: &ruma::UserId,
        room_id: &ruma::RoomId,
        invitee: &ruma::UserId,
        reason: Option<String>,
    ) -> Result<ruma::OwnedEventId, ServiceError> {
        if invitee.server_name() == self.server_name() || !self.federation.is_enabled() {
            return self.rooms.set_membership(sender, room_id, invitee, "invite", reason).await;
        }
        let content = rooms::member_content("invite", reason);
        self.federation.invite_remote(sender, room_id, invitee, content).await
    }

    /// `POST /leave`: leaves the room; an invite from another server to a room this server is
    /// not in is refused, and a knock on one withdrawn, through a server of the room.
    pub async fn leave(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        reason: Option<String>,
    ) -> Result<ruma::OwnedEventId, ServiceError> {
        let out_of_band = self.rooms.out_of_band(user_id, room_id).await?;
        let pending = out_of_band.is_some_and(|record| matches!(record.membership.as_str(), "invite" | "knock"));
        if pending && self.federation.is_enabled() {
            return self.federation.leave_out_of_band(user_id, room_id, reason).await;
        }
        self.rooms.set_membership(user_id, room_id, user_id, "leave", reason).await
    }

    /// Joins a room: here when this server has a member in it, else over federation through
    /// `via` (and the server the room ID names, if any, and the server of whoever invited the
    /// user).
    pub async fn join(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        via: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<ruma::OwnedEventId, ServiceError> {
        if self.resident_in(room_id).await? || !self.federation.is_enabled() {
            return self.rooms.join_room(user_id, room_id, reason).await;
        }
        let mut servers: Vec<OwnedServerName> = via.to_vec();
        if let Some(inviter) = self.inviting_server(user_id, room_id).await?
            && !servers.contains(&inviter)
        {
            servers.push(inviter);
        }
        self.federation.join_remote(user_id, room_id, &with_room_server(servers, room_id), reason).await
    }

    /// `POST /knock`: knocks here when this server has a member in the room, else over
    /// federation through `via` (and the server the room ID names, if any).
    pub async fn knock(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
        via: &[OwnedServerName],
        reason: Option<String>,
    ) -> Result<ruma::OwnedEventId, ServiceError> {
        if self.resident_in(room_id).await? || !self.federation.is_enabled() {
            return self.rooms.knock(user_id, room_id, reason).await;
        }
        self.federation.knock_remote(user_id, room_id, &with_room_server(via.to_vec(), room_id), reason).await
    }

    /// Whether this server has a member in the room (so memberships are made here).
    async fn resident_in(&self, room_id: &ruma::RoomId) -> Result<bool, ServiceError> {
        match self.rooms.room_version(room_id).await {
            Ok(_) => self.rooms.server_in_room(self.server_name(), room_id).await,
            Err(ServiceError::NotFound(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The server of whoever invited the user to a room this server is not in.
    async fn inviting_server(
        &self,
        user_id: &ruma::UserId,
        room_id: &ruma::RoomId,
    ) -> Result<Option<OwnedServerName>, ServiceError> {
        let Some(record) = self.rooms.out_of_band(user_id, room_id).await? else { return Ok(None) };
        let version = lattice_core::room_version::RoomVersion::parse(&record.room_version)?;
        let invite = self.rooms.stored_pdu(&version, &record.event_id).await?;
        Ok(Some(ruma::state_res::Event::sender(&invite).server_name().to_owned()))
    }

    /// Delayed events (MSC4140); the binary runs [`DelayedEvents::run`] on a clone.
    pub fn delayed_events(&self) -> &Arc<DelayedEvents> {
        &self.delayed_events
    }

    pub fn sync(&self) -> &Sync {
        &self.sync
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

/// `servers` and, last, the server a room ID names (room versions before 12), once.
fn with_room_server(mut servers: Vec<OwnedServerName>, room_id: &ruma::RoomId) -> Vec<OwnedServerName> {
    if let Some(server) = room_id.server_name()
        && !servers.iter().any(|s| s == server)
    {
        servers.push(server.to_owned());
    }
    servers
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
        push_badge_counts_messages: false,
        user_directory_search_all_users: false,
        turn: None,
        media: MediaConfig::default(),
        presence: PresenceConfig::default(),
        delayed_events: DelayedEventsConfig::default(),
    }
}

#[cfg(test)]
fn test_signing_key() -> Arc<Ed25519KeyPair> {
    Arc::new(Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "test".into()).expect("generated key parses"))
}
