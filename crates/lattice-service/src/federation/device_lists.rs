//! Other servers' users' device lists, kept in the e2ee service's cache (`e2ee/remote_lists.rs`)
//! for the remote users who share a room with a local user (spec v1.16, server-server "Device
//! Management"):
//!
//! - `m.device_list_update` EDUs are applied when their `prev_id`s were all seen; a gap, or an
//!   update about a user not cached yet, starts a resync (`GET /user/devices/{userId}`) in the
//!   background, so the transaction never waits for it;
//! - `m.signing_key_update` EDUs replace the cached master and self-signing keys;
//! - `/keys/query` answers cached, fresh users from the cache and asks the server only for the
//!   others, starting a resync for those who share a room with a local user (that is how a user
//!   starts being cached);
//! - resyncs are de-duplicated per user, at most [`MAX_CONCURRENT_RESYNCS`] run at once and at
//!   most [`MAX_PENDING_RESYNCS`] wait; one that fails marks the list stale, so queries ask the
//!   user's server until a later resync succeeds;
//! - a user who no longer shares a room with any local user is dropped from the cache when next
//!   touched (an update, a query or a resync), so a list nobody updates any more is never served.
//!
//! Every update ends with one device-list change (applied, or its resync's, or that resync's
//! failure), so local room-mates' `/sync` and `/keys/changes` tell them to ask again. A resync
//! a query started announces its success only: its failure changes nothing clients see.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use lattice_federation::FederationClient;
use lattice_federation::client::Auth;
use ruma::{OwnedRoomId, OwnedUserId, ServerName, UserId};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, encode, parse};
use crate::ServiceError;
use crate::e2ee::{
    Applied, E2ee, ListUpdate, PublishedChange, QueriedKeys, RemoteDeviceUpdate, RemoteSnapshot,
    checked_cross_signing_key,
};
use crate::notifier::Notifier;
use crate::rooms::Rooms;

/// Resyncs running at once (each is one request to another server).
pub const MAX_CONCURRENT_RESYNCS: usize = 4;
/// Users waiting for a resync; beyond this an update is only announced (clients then ask the
/// user's server, as for a stale list).
pub const MAX_PENDING_RESYNCS: usize = 1_000;
/// The longest a resync waits for the other server.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a resync asks again when the list changed while it was asking.
const RESYNC_ATTEMPTS: usize = 3;
/// A list of 1,000 devices with their keys fits.
const MAX_DEVICE_LIST_BYTES: usize = 16 * MAX_SMALL_RESPONSE_BYTES;

/// The users whose resync is pending or running.
pub(super) struct Resyncs {
    pending: Mutex<HashMap<OwnedUserId, Pending>>,
    permits: Semaphore,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pending {
    /// It must run once more (asked for again while it was asking).
    again: bool,
    /// An update asked for it: local clients must hear of the list's change even if it fails.
    /// (A resync a query asked for announces only success: a failure changes nothing they see,
    /// and announcing it would have their clients query, and fail, again and again.)
    announce: bool,
}

impl Default for Resyncs {
    fn default() -> Self {
        Self { pending: Mutex::new(HashMap::new()), permits: Semaphore::new(MAX_CONCURRENT_RESYNCS) }
    }
}

impl Resyncs {
    /// Registers a resync of `user`: `Some(true)` when a task must be started, `Some(false)`
    /// when the running one will go once more, `None` when too many are pending.
    fn register(&self, user: &UserId, announce: bool) -> Option<bool> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(waiting) = pending.get_mut(user) {
            waiting.again = true;
            waiting.announce |= announce;
            return Some(false);
        }
        if pending.len() >= MAX_PENDING_RESYNCS {
            return None;
        }
        pending.insert(user.to_owned(), Pending { again: false, announce });
        Some(true)
    }

    /// Before a run of `user`'s resync: whether a failure must be announced (the flag is taken).
    fn take_announce(&self, user: &UserId) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.get_mut(user).is_some_and(|waiting| std::mem::take(&mut waiting.announce))
    }

    /// After a run of `user`'s resync: whether it must run once more (otherwise it is forgotten).
    fn again(&self, user: &UserId) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.get_mut(user) {
            Some(waiting) if waiting.again => {
                waiting.again = false;
                true
            }
            _ => {
                pending.remove(user);
                false
            }
        }
    }
}

/// Rooms already looked at in one request: whether a local user is joined to each.
type LocalRooms = HashMap<OwnedRoomId, bool>;

/// Whether a user of this server shares a joined room with `user` now (`seen` remembers the
/// rooms looked at, for a request about many users).
async fn shares_room_with_local_user(
    rooms: &Rooms,
    user: &UserId,
    seen: &mut LocalRooms,
) -> Result<bool, ServiceError> {
    for room in rooms.joined_rooms(user).await? {
        let local = match seen.get(&room) {
            Some(local) => *local,
            None => {
                let local = rooms.has_local_member(&room).await?;
                seen.insert(room, local);
                local
            }
        };
        if local {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What a background resync needs: owned handles, as it outlives the request that started it.
#[derive(Clone)]
struct Resyncer {
    e2ee: Arc<E2ee>,
    rooms: Arc<Rooms>,
    notifier: Arc<Notifier>,
    client: Arc<FederationClient>,
    resyncs: Arc<Resyncs>,
}

impl Resyncer {
    async fn run(self, user: OwnedUserId) {
        let Ok(_permit) = self.resyncs.permits.acquire().await else { return };
        loop {
            let announce = self.resyncs.take_announce(&user);
            self.resync_once(&user, announce).await;
            if !self.resyncs.again(&user) {
                break;
            }
        }
    }

    async fn resync_once(&self, user: &UserId, announce: bool) {
        let change = match self.resync(user).await {
            Ok(change) => change,
            Err(error) => {
                tracing::info!(%user, %error, "a device-list resync failed; the list is stale");
                match self.e2ee.mark_remote_list_stale(user, announce).await {
                    Ok(change) => change,
                    Err(error) => {
                        tracing::warn!(%user, %error, "a failed resync was not recorded");
                        None
                    }
                }
            }
        };
        if let Some(change) = change {
            announce_change(&self.rooms, &self.notifier, &change).await;
        }
    }

    /// Asks the user's server for the whole list and replaces the cached one with it, unless
    /// no local user shares a room with them any more (then the cache is dropped: `None`).
    async fn resync(&self, user: &UserId) -> Result<Option<PublishedChange>, ServiceError> {
        for _ in 0..RESYNC_ATTEMPTS {
            if !shares_room_with_local_user(&self.rooms, user, &mut LocalRooms::new()).await? {
                self.e2ee.drop_remote_list(user).await?;
                return Ok(None);
            }
            let expected = self.e2ee.remote_list(user).await?.map(|(_, raw)| raw);
            let path = format!("/_matrix/federation/v1/user/devices/{}", encode(user.as_str()));
            let asked =
                self.client.request(user.server_name(), Method::GET, &path, None, Auth::Signed, MAX_DEVICE_LIST_BYTES);
            let bytes = tokio::time::timeout(RESYNC_TIMEOUT, asked)
                .await
                .map_err(|_| ServiceError::Remote(format!("{} did not answer in time", user.server_name())))??;
            let snapshot = RemoteSnapshot::parse(user, &parse::<Value>(&bytes)?)?;
            if let Some(change) = self.e2ee.replace_remote_list(user, expected, snapshot).await? {
                return Ok(Some(change));
            }
        }
        Err(ServiceError::Remote("the device list kept changing while it was asked for".into()))
    }
}

/// Wakes the changed user's waiters and every room they are joined to.
async fn announce_change(rooms: &Rooms, notifier: &Notifier, change: &PublishedChange) {
    for user in change.users() {
        notifier.notify_user(&user);
        match rooms.joined_rooms(&user).await {
            Ok(joined) => joined.iter().for_each(|room| notifier.notify_room(room)),
            Err(error) => tracing::warn!(%user, %error, "a device-list change woke no room"),
        }
    }
}

/// The user an EDU is about, only if it is one of the origin's users.
fn edu_user(origin: &ServerName, content: &Value) -> Result<OwnedUserId, String> {
    let user = content["user_id"]
        .as_str()
        .and_then(|user| OwnedUserId::try_from(user).ok())
        .ok_or("device-list update without a valid user_id")?;
    if user.server_name() != origin {
        return Err(format!("{origin} cannot speak for {user}"));
    }
    Ok(user)
}

impl Federation {
    /// Starts a background resync of `user`'s list (or has the running one go again); with
    /// `announce` (an update asked for it), even its failure is a change of the list. `false`
    /// when none could be started (federation off, too many pending).
    pub(super) fn schedule_resync(&self, user: &UserId, announce: bool) -> bool {
        let Ok(remote) = self.remote() else { return false };
        match self.resyncs.register(user, announce) {
            None => false,
            Some(false) => true,
            Some(true) => {
                let resyncer = Resyncer {
                    e2ee: self.e2ee.clone(),
                    rooms: self.rooms.clone(),
                    notifier: self.notifier.clone(),
                    client: remote.keys.client().clone(),
                    resyncs: self.resyncs.clone(),
                };
                tokio::spawn(resyncer.run(user.to_owned()));
                true
            }
        }
    }

    /// Records a change of a remote user's list that is not (yet) in the cache, so local
    /// room-mates ask again (their server answers).
    async fn announce_uncached_change(&self, user: &UserId) -> Result<(), ServiceError> {
        let change = self.e2ee.record_device_list_change(vec![ListUpdate::Quiet { user: user.to_owned() }]).await?;
        announce_change(&self.rooms, &self.notifier, &change).await;
        Ok(())
    }

    /// Whether `user` shares a room with a local user; when not, their cached list (if any)
    /// is dropped.
    async fn still_shared(&self, user: &UserId, seen: &mut LocalRooms) -> Result<bool, ServiceError> {
        if shares_room_with_local_user(&self.rooms, user, seen).await? {
            return Ok(true);
        }
        if self.e2ee.remote_list(user).await?.is_some() {
            tracing::debug!(%user, "no local user shares a room with them any more: their device list is dropped");
            self.e2ee.drop_remote_list(user).await?;
        }
        Ok(false)
    }

    /// An `m.device_list_update` EDU about one of the origin's users who shares a room with a
    /// local user: applied to the cached list when it follows what was applied; otherwise a
    /// resync is started (a gap, or a user not cached yet).
    pub(super) async fn receive_device_list_update(&self, origin: &ServerName, content: &Value) -> Result<(), String> {
        let user = edu_user(origin, content)?;
        let update = RemoteDeviceUpdate::parse(user.clone(), content).map_err(|e| e.to_string())?;
        self.apply_device_list_update(&update).await.map_err(|e| e.to_string())
    }

    async fn apply_device_list_update(&self, update: &RemoteDeviceUpdate) -> Result<(), ServiceError> {
        let user = &update.user;
        if !self.still_shared(user, &mut LocalRooms::new()).await? {
            return Ok(());
        }
        match self.e2ee.apply_remote_device_update(update).await? {
            Applied::Changed(change) => announce_change(&self.rooms, &self.notifier, &change).await,
            Applied::Untracked | Applied::Gap => {
                if !self.schedule_resync(user, true) {
                    self.announce_uncached_change(user).await?;
                }
            }
        }
        Ok(())
    }

    /// An `m.signing_key_update` EDU about one of the origin's users: the cached master and
    /// self-signing keys replaced (keys that do not name the user and usage refuse the EDU).
    pub(super) async fn receive_signing_key_update(&self, origin: &ServerName, content: &Value) -> Result<(), String> {
        let user = edu_user(origin, content)?;
        let key = |field: &str, usage: &str| match &content[field] {
            Value::Null => Ok(None),
            key => checked_cross_signing_key(&user, usage, key).map(Some).map_err(|e| e.to_string()),
        };
        let (master, self_signing) = (key("master_key", "master")?, key("self_signing_key", "self_signing")?);
        self.apply_signing_key_update(&user, master, self_signing).await.map_err(|e| e.to_string())
    }

    async fn apply_signing_key_update(
        &self,
        user: &UserId,
        master: Option<Map<String, Value>>,
        self_signing: Option<Map<String, Value>>,
    ) -> Result<(), ServiceError> {
        if !self.still_shared(user, &mut LocalRooms::new()).await? {
            return Ok(());
        }
        match self.e2ee.apply_remote_signing_keys(user, master, self_signing).await? {
            Some(change) => announce_change(&self.rooms, &self.notifier, &change).await,
            None => self.announce_uncached_change(user).await?,
        }
        Ok(())
    }

    /// The part of a client's `/keys/query` for other servers' users that the cache answers
    /// (cached, fresh lists of users who still share a room with a local user), and the rest,
    /// to ask their servers. A user of the rest who shares a room with a local user starts
    /// being cached (a resync in the background).
    pub(crate) async fn cached_remote_keys(
        &self,
        targets: BTreeMap<OwnedUserId, Vec<String>>,
    ) -> Result<(QueriedKeys, BTreeMap<OwnedUserId, Vec<String>>), ServiceError> {
        let mut cacheable = BTreeMap::new();
        let mut rest = BTreeMap::new();
        let mut seen = LocalRooms::new();
        for (user, wanted) in targets {
            if self.still_shared(&user, &mut seen).await? {
                cacheable.insert(user, wanted);
            } else {
                rest.insert(user, wanted);
            }
        }
        let (found, answered) = self.e2ee.cached_remote_keys(&cacheable).await?;
        for (user, wanted) in cacheable {
            if !answered.contains(&user) {
                self.schedule_resync(&user, false);
                rest.insert(user, wanted);
            }
        }
        Ok((found, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_are_deduplicated_and_bounded() {
        let resyncs = Resyncs::default();
        let bob: OwnedUserId = "@bob:remote.test".try_into().expect("user");
        assert_eq!(resyncs.register(&bob, false), Some(true), "a first resync starts a task");
        assert!(!resyncs.take_announce(&bob), "a query's resync announces only success");
        assert_eq!(resyncs.register(&bob, true), Some(false), "a second only asks the running one to go again");
        assert!(resyncs.again(&bob), "it goes once more");
        assert!(resyncs.take_announce(&bob), "and that run was asked for by an update");
        assert!(!resyncs.take_announce(&bob), "once");
        assert!(!resyncs.again(&bob), "then it is done");
        assert_eq!(resyncs.register(&bob, false), Some(true), "and a later one starts afresh");
        for n in 1..MAX_PENDING_RESYNCS {
            let user: OwnedUserId = format!("@u{n}:remote.test").try_into().expect("user");
            assert_eq!(resyncs.register(&user, false), Some(true));
        }
        let one_more: OwnedUserId = "@late:remote.test".try_into().expect("user");
        assert_eq!(resyncs.register(&one_more, true), None, "no more than {MAX_PENDING_RESYNCS} pending");
    }
}
