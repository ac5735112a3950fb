//! The presence service (spec "Presence"): who is online, idle or offline, with their status
//! messages, for local users and for other servers' users who share a room with a local one.
//!
//! Live presence is kept in memory: a `/sync` only marks its user as syncing and active there.
//! Each change others should hear of (state, status message) takes a position in its own stream
//! (`stream.presence`), is stamped in memory before that position is published (as typing is),
//! and wakes the syncs of the changed user and of everyone sharing a room with them — each
//! room's waiters, no one else. A local user's change is also written to the `presence` table
//! (state, status message, last activity, whether the user chose the state), so a restart keeps
//! them; users of other servers are not written, their servers tell again.
//!
//! Time moves users on (idle → `unavailable`, no syncs → `offline`, a silent server's users →
//! `offline`) in [`Presence::apply_timeouts`], which one task calls periodically
//! (`Service::run_presence`); the rules themselves are `lattice_core::presence`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use lattice_core::limits::MAX_STATUS_MSG_BYTES;
pub use lattice_core::presence::{PresenceState, PresenceTimeouts, UserPresence};
use lattice_storage::records::PresenceRecord;
use lattice_storage::{KeyRange, KvStore, ScopedStore, StreamPositions, Table, TableScope, WriteBatch, keys};
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::notifier::Notifier;
use crate::rooms::{EventFilter, Rooms};
use crate::{Clock, ServiceError};

pub(crate) const TABLES: TableScope = TableScope { owner: "presence", tables: &[Table::Presence] };

/// How many per-user write locks there are; users share one when their IDs hash alike.
const USER_LOCK_STRIPES: usize = 64;

/// How often a local user who stays online or idle is announced again to other servers, so
/// that their remote timeout (30 minutes, see [`PresenceConfig::default`]) never fires.
pub const FEDERATION_REPEAT_MS: u64 = 25 * 60 * 1000;

/// `[presence]`: whether presence is tracked at all, and its timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceConfig {
    /// Off: nothing is tracked, `/sync` carries no presence, `GET` answers `offline`, `PUT`
    /// is refused, and no presence EDU is sent or accepted.
    pub enabled: bool,
    pub timeouts: PresenceTimeouts,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeouts: PresenceTimeouts { idle_ms: 5 * 60 * 1000, offline_ms: 30 * 1000, remote_ms: 30 * 60 * 1000 },
        }
    }
}

/// One user's presence as this server holds it.
#[derive(Clone, Debug, Default)]
struct Entry {
    presence: UserPresence,
    /// The position of the last change others were told of; 0 for a state loaded at start
    /// (no sync token from before the start needs it again).
    position: u64,
    /// `/sync` requests of the user running now (local users).
    syncing: u32,
    /// When the user's last sync started or ended (local users), or when their server last
    /// told of them (remote users).
    last_seen_ts: u64,
    /// When this (local) user's state was last queued for other servers.
    last_federated_ts: u64,
}

#[derive(Default)]
struct PresenceMap {
    users: HashMap<OwnedUserId, Entry>,
    /// The users whose last change is at each position: what an incremental sync reads.
    changes: BTreeMap<u64, BTreeSet<OwnedUserId>>,
}

impl PresenceMap {
    /// Records `presence` as the user's state, changed at `position`.
    fn stamp(&mut self, user: &UserId, presence: UserPresence, position: u64) {
        let entry = self.users.entry(user.to_owned()).or_default();
        if let Some(users) = self.changes.get_mut(&entry.position) {
            users.remove(user);
            if users.is_empty() {
                self.changes.remove(&entry.position);
            }
        }
        // A slower, older stamp never hides a newer one.
        entry.position = entry.position.max(position);
        entry.presence = presence;
        self.changes.entry(entry.position).or_default().insert(user.to_owned());
    }
}

/// The presence service.
pub struct Presence {
    config: PresenceConfig,
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
    /// `stream.presence`: one position per change (a timeout sweep's changes share one).
    stream: StreamPositions,
    notifier: Arc<Notifier>,
    /// Who shares a room with whom, for wake-ups and for who may see what.
    rooms: Arc<Rooms>,
    table: Mutex<PresenceMap>,
    /// The stored states are read once, before the first use.
    loaded: OnceCell<()>,
    /// Line up changes of one user, so the stored record is always the latest change's.
    user_locks: Vec<tokio::sync::Mutex<()>>,
    /// Local users whose change other servers have not been told of yet.
    outbound: Mutex<BTreeSet<OwnedUserId>>,
    outbound_ready: tokio::sync::Notify,
}

/// A running `/sync`: while it lives, its user counts as syncing (and so never times out to
/// `offline`); dropping it records the sync's end.
pub struct SyncingGuard {
    presence: Option<Arc<Presence>>,
    user: OwnedUserId,
}

impl Drop for SyncingGuard {
    fn drop(&mut self) {
        let Some(presence) = self.presence.take() else { return };
        let now = presence.clock.now_ms();
        let mut table = presence.lock();
        if let Some(entry) = table.users.get_mut(&self.user) {
            entry.syncing = entry.syncing.saturating_sub(1);
            entry.last_seen_ts = now;
        }
    }
}

/// A state change the caller (the composition) may have to tell other servers of.
pub(crate) struct PresenceUpdate {
    pub user: OwnedUserId,
    pub presence: UserPresence,
}

fn record_of(presence: &UserPresence) -> PresenceRecord {
    PresenceRecord {
        presence: presence.state.as_str().to_owned(),
        status_msg: presence.status_msg.clone(),
        last_active_ts: presence.last_active_ts,
        explicit: presence.explicit,
    }
}

fn presence_of(record: PresenceRecord) -> Option<UserPresence> {
    Some(UserPresence {
        state: PresenceState::parse(&record.presence)?,
        status_msg: record.status_msg,
        last_active_ts: record.last_active_ts,
        explicit: record.explicit,
    })
}

/// The `content` of an `m.presence` event (and the body of `GET /presence`) at `now`.
pub fn presence_content(presence: &UserPresence, now: u64) -> Value {
    let mut content = json!({
        "presence": presence.state.as_str(),
        "currently_active": presence.currently_active(),
    });
    if presence.last_active_ts > 0 {
        content["last_active_ago"] = json!(now.saturating_sub(presence.last_active_ts));
    }
    if let Some(message) = &presence.status_msg {
        content["status_msg"] = json!(message);
    }
    content
}

/// A status message as a client or server gave it: bounded.
pub fn check_status_msg(status_msg: Option<&str>) -> Result<(), ServiceError> {
    if status_msg.is_some_and(|message| message.len() > MAX_STATUS_MSG_BYTES) {
        return Err(ServiceError::InvalidParam(format!("status_msg is longer than {MAX_STATUS_MSG_BYTES} bytes")));
    }
    Ok(())
}

impl Presence {
    pub(crate) fn new(
        config: PresenceConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        stream: StreamPositions,
        notifier: Arc<Notifier>,
        rooms: Arc<Rooms>,
    ) -> Self {
        Self {
            config,
            kv: ScopedStore::new(kv, TABLES),
            clock,
            stream,
            notifier,
            rooms,
            table: Default::default(),
            loaded: OnceCell::new(),
            user_locks: (0..USER_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            outbound: Default::default(),
            outbound_ready: Default::default(),
        }
    }

    pub fn config(&self) -> &PresenceConfig {
        &self.config
    }

    pub fn is_enabled(&self) -> bool {
        self.config.enabled
    }

    fn lock(&self) -> MutexGuard<'_, PresenceMap> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stripe(&self, user: &UserId) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut hasher);
        (hasher.finish() as usize) % USER_LOCK_STRIPES
    }

    /// Reads the stored states of local users into memory, once. Each counts as last seen
    /// now, so a user online before a restart goes offline after the offline timeout unless
    /// they sync again.
    async fn ensure_loaded(&self) -> Result<(), ServiceError> {
        self.loaded
            .get_or_try_init(|| async {
                let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::Presence, &KeyRange::all()).await?;
                let now = self.clock.now_ms();
                let mut table = self.lock();
                for (key, raw) in rows {
                    let user = OwnedUserId::try_from(String::from_utf8_lossy(&key).into_owned());
                    let record = serde_json::from_slice::<PresenceRecord>(&raw).ok().and_then(presence_of);
                    let (Ok(user), Some(presence)) = (user, record) else {
                        tracing::warn!("skipping an unreadable presence row");
                        continue;
                    };
                    table.users.insert(user, Entry { presence, last_seen_ts: now, ..Entry::default() });
                }
                Ok::<(), ServiceError>(())
            })
            .await?;
        Ok(())
    }

    /// The completed mark of the presence stream.
    pub(crate) async fn position(&self) -> Result<u64, ServiceError> {
        Ok(self.stream.completed().await?)
    }

    /// The user's presence as this server knows it (offline when unknown).
    pub async fn current(&self, user: &UserId) -> Result<UserPresence, ServiceError> {
        if !self.config.enabled {
            return Ok(UserPresence::default());
        }
        self.ensure_loaded().await?;
        Ok(self.lock().users.get(user).map(|entry| entry.presence.clone()).unwrap_or_default())
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// `PUT /presence/{userId}/status` by the user themself (the caller checked who asks).
    pub(crate) async fn set_by_user(
        &self,
        user: &UserId,
        state: PresenceState,
        status_msg: Option<String>,
    ) -> Result<(), ServiceError> {
        if !self.config.enabled {
            return Err(ServiceError::Forbidden("presence is disabled on this server".into()));
        }
        check_status_msg(status_msg.as_deref())?;
        self.ensure_loaded().await?;
        let now = self.clock.now_ms();
        // Setting one's presence is being here: the offline timeout counts from it as from a
        // sync, so a client that sets its presence and never syncs goes offline after it.
        self.lock().users.entry(user.to_owned()).or_default().last_seen_ts = now;
        self.change_local(user, |current| current.set_by_user(state, status_msg, now)).await
    }

    /// A `/sync` starts: the user counts as syncing until the guard is dropped, and
    /// `set_presence` applies (`online`: activity, and online unless the user chose
    /// otherwise). `offline` leaves the user's presence alone entirely.
    /// A failure to record the change is logged, not the sync's: the sync still answers.
    pub(crate) async fn sync_started(self: &Arc<Self>, user: &UserId, set_presence: PresenceState) -> SyncingGuard {
        match self.track_sync(user, set_presence).await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::warn!(%user, %error, "a sync's presence was not recorded");
                SyncingGuard { presence: None, user: user.to_owned() }
            }
        }
    }

    async fn track_sync(
        self: &Arc<Self>,
        user: &UserId,
        set_presence: PresenceState,
    ) -> Result<SyncingGuard, ServiceError> {
        let idle_guard = SyncingGuard { presence: None, user: user.to_owned() };
        if !self.config.enabled || set_presence == PresenceState::Offline {
            return Ok(idle_guard);
        }
        self.ensure_loaded().await?;
        let now = self.clock.now_ms();
        {
            let mut table = self.lock();
            let entry = table.users.entry(user.to_owned()).or_default();
            entry.syncing += 1;
            entry.last_seen_ts = now;
        }
        let guard = SyncingGuard { presence: Some(self.clone()), user: user.to_owned() };
        self.change_local(user, |current| current.synced(set_presence, now)).await?;
        Ok(guard)
    }

    /// Applies `change` to a local user's presence: a visible or durable change is written,
    /// stamped, announced to the user's room-mates and queued for other servers; a new
    /// activity time alone is only kept in memory.
    async fn change_local(
        &self,
        user: &UserId,
        change: impl FnOnce(&UserPresence) -> UserPresence,
    ) -> Result<(), ServiceError> {
        self.ensure_loaded().await?;
        let _line = self.user_locks[self.stripe(user)].lock().await;
        let current = self.lock().users.get(user).map(|entry| entry.presence.clone()).unwrap_or_default();
        let next = change(&current);
        if !next.differs_durably(&current) {
            self.lock().users.entry(user.to_owned()).or_default().presence = next;
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        lattice_storage::put(&mut batch, keys::user(user.as_str()), &record_of(&next));
        self.kv.write(batch).await?;
        if next.differs_visibly(&current) {
            self.publish(std::slice::from_ref(&(user.to_owned(), next))).await?;
            self.queue_outbound([user.to_owned()]);
        } else {
            self.lock().users.entry(user.to_owned()).or_default().presence = next;
        }
        Ok(())
    }

    /// Gives the changes one new position, stamps them in memory before it is published (no
    /// sync can pass the position before the changes carry it), then wakes the changed users
    /// and every room they are joined to.
    async fn publish(&self, changes: &[(OwnedUserId, UserPresence)]) -> Result<(), ServiceError> {
        if changes.is_empty() {
            return Ok(());
        }
        let position = self.stream.take().await?;
        {
            let mut table = self.lock();
            for (user, presence) in changes {
                table.stamp(user, presence.clone(), position.get());
            }
        }
        position.published().await;
        let mut rooms: HashSet<OwnedRoomId> = HashSet::new();
        for (user, _) in changes {
            self.notifier.notify_user(user);
            rooms.extend(self.rooms.joined_rooms(user).await?);
        }
        for room in &rooms {
            self.notifier.notify_room(room);
        }
        Ok(())
    }

    fn queue_outbound(&self, users: impl IntoIterator<Item = OwnedUserId>) {
        let mut outbound = self.outbound.lock().unwrap_or_else(|p| p.into_inner());
        let before = outbound.len();
        outbound.extend(users);
        if outbound.len() > before {
            self.outbound_ready.notify_one();
        }
    }

    /// Local users whose state other servers should hear of now, with that state (taken:
    /// the caller queues them).
    pub(crate) fn take_outbound(&self) -> Vec<PresenceUpdate> {
        let users = std::mem::take(&mut *self.outbound.lock().unwrap_or_else(|p| p.into_inner()));
        let now = self.clock.now_ms();
        let mut table = self.lock();
        users
            .into_iter()
            .filter_map(|user| {
                let entry = table.users.get_mut(&user)?;
                entry.last_federated_ts = now;
                Some(PresenceUpdate { presence: entry.presence.clone(), user })
            })
            .collect()
    }

    /// Resolves when a local change waits for other servers (or at once if one already does).
    pub(crate) async fn outbound_waiting(&self) {
        self.outbound_ready.notified().await;
    }

    /// Moves every user time has moved on (see `lattice_core::presence`) in one write and
    /// one stream position; queues local users who stay online or idle to be announced to
    /// other servers again once [`FEDERATION_REPEAT_MS`] has passed. Returns how many
    /// changed.
    pub async fn apply_timeouts(&self) -> Result<usize, ServiceError> {
        if !self.config.enabled {
            return Ok(0);
        }
        self.ensure_loaded().await?;
        let now = self.clock.now_ms();
        let local = |user: &UserId| user.server_name() == self.rooms.server_name();
        let (candidates, repeat): (Vec<OwnedUserId>, Vec<OwnedUserId>) = {
            let table = self.lock();
            let moved = table.users.iter().filter(|(user, entry)| self.moved_by_time(user, entry, now).is_some());
            let repeat = table.users.iter().filter(|(user, entry)| {
                local(user)
                    && entry.presence.state != PresenceState::Offline
                    && now.saturating_sub(entry.last_federated_ts) >= FEDERATION_REPEAT_MS
            });
            (moved.map(|(user, _)| user.clone()).collect(), repeat.map(|(user, _)| user.clone()).collect())
        };
        self.queue_outbound(repeat);
        if candidates.is_empty() {
            return Ok(0);
        }
        // Every candidate's write lock, in stripe order (no other path holds two), so no
        // change of theirs lands between this look and this write.
        let stripes: BTreeSet<usize> = candidates.iter().map(|user| self.stripe(user)).collect();
        let mut held = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            held.push(self.user_locks[stripe].lock().await);
        }
        let changes: Vec<(OwnedUserId, UserPresence)> = {
            let table = self.lock();
            candidates
                .into_iter()
                .filter_map(|user| {
                    let next = self.moved_by_time(&user, table.users.get(&user)?, now)?;
                    Some((user, next))
                })
                .collect()
        };
        let mut batch = WriteBatch::new();
        for (user, presence) in changes.iter().filter(|(user, _)| local(user)) {
            lattice_storage::put(&mut batch, keys::user(user.as_str()), &record_of(presence));
        }
        if !batch.is_empty() {
            self.kv.write(batch).await?;
        }
        self.publish(&changes).await?;
        drop(held);
        self.queue_outbound(changes.iter().map(|(user, _)| user.clone()).filter(|user| local(user)));
        Ok(changes.len())
    }

    /// What time does to one user now, if anything.
    fn moved_by_time(&self, user: &UserId, entry: &Entry, now: u64) -> Option<UserPresence> {
        let timeouts = &self.config.timeouts;
        if user.server_name() == self.rooms.server_name() {
            entry.presence.after_local_timeouts(entry.syncing > 0, entry.last_seen_ts, now, timeouts)
        } else {
            entry.presence.after_remote_timeout(entry.last_seen_ts, now, timeouts)
        }
    }

    /// A user of another server, as their server told (the caller checked that the server
    /// speaks for them and that they share a room with a local user).
    pub(crate) async fn receive_remote(&self, user: &UserId, presence: UserPresence) -> Result<(), ServiceError> {
        if !self.config.enabled {
            return Ok(());
        }
        self.ensure_loaded().await?;
        let now = self.clock.now_ms();
        let _line = self.user_locks[self.stripe(user)].lock().await;
        let visible = {
            let mut table = self.lock();
            let entry = table.users.entry(user.to_owned()).or_default();
            entry.last_seen_ts = now;
            let visible = presence.differs_visibly(&entry.presence);
            if !visible {
                entry.presence = presence.clone();
            }
            visible
        };
        if visible {
            self.publish(&[(user.to_owned(), presence)]).await?;
        }
        Ok(())
    }

    /// The `m.presence` events for `viewer`'s sync: users who share a room with them (and
    /// themself) whose presence changed in `(since, now]` or, for an initial sync, everyone
    /// with something to tell; narrowed by the sync filter's `presence` part.
    pub(crate) async fn events_for(
        &self,
        viewer: &UserId,
        range: (u64, u64),
        initial: bool,
        filter: &EventFilter,
    ) -> Result<Vec<Value>, ServiceError> {
        let limit = filter.limit.map_or(usize::MAX, |limit| usize::try_from(limit).unwrap_or(usize::MAX));
        if !self.config.enabled || !filter.allows_type("m.presence") || limit == 0 {
            return Ok(Vec::new());
        }
        self.ensure_loaded().await?;
        let (since, now) = range;
        let candidates: BTreeSet<OwnedUserId> = {
            let table = self.lock();
            let users: Vec<&OwnedUserId> = match initial {
                true => {
                    table.users.iter().filter(|(_, entry)| !entry.presence.is_blank()).map(|(user, _)| user).collect()
                }
                false if since >= now => Vec::new(),
                false => table.changes.range(since + 1..=now).flat_map(|(_, users)| users).collect(),
            };
            users.into_iter().filter(|user| filter.allows_sender(user.as_str())).cloned().collect()
        };
        let shared = crate::composed_keys::shared_with(&self.rooms, viewer, candidates).await?;
        let at = self.clock.now_ms();
        let table = self.lock();
        // Newest change first (sorted below), so a limit keeps the freshest news.
        let mut ordered: Vec<(u64, &OwnedUserId, &Entry)> =
            shared.iter().filter_map(|user| table.users.get(user).map(|entry| (entry.position, user, entry))).collect();
        ordered.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        Ok(ordered
            .into_iter()
            .take(limit)
            .map(|(_, user, entry)| {
                json!({ "type": "m.presence", "sender": user, "content": presence_content(&entry.presence, at) })
            })
            .collect())
    }
}
