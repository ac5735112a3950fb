//! The federation service: rooms shared with other servers. Inbound, it answers the
//! server-server API (`/send` transactions through the one ingest path, joins, and the reads
//! other servers make, each filtered by history visibility for the asking server); outbound, it
//! joins rooms on other servers and forwards this server's events to every server in their room
//! through the durable per-destination queues of `lattice_federation::Sender`.
//!
//! It owns the `federation_transactions` table (inbound transaction IDs, for idempotence); the
//! queues' table belongs to the sender. Everything about rooms goes through [`Rooms`].

mod device_lists;
mod directory;
mod e2ee;
mod forward;
mod hierarchy;
mod inbound;
mod invites;
mod join;
mod knocks;
mod presence;
mod refetch;
mod signature_checks;
mod timestamps;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lattice_core::room_version::RoomVersion;
use lattice_federation::{KeyCache, Sender};
use lattice_storage::{KvStore, ScopedStore, StreamPositions, Table, TableScope};
use ruma::signatures::PublicKeyMap;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName};

pub use device_lists::{MAX_CONCURRENT_RESYNCS, MAX_PENDING_RESYNCS};
pub use e2ee::{MAX_REMOTE_KEYS_WAIT, RemoteFailures};
pub use hierarchy::{DEFAULT_HIERARCHY_LIMIT, HierarchyQuery, MAX_HIERARCHY_DEPTH, MAX_HIERARCHY_LIMIT};
pub use inbound::{PduResults, TransactionBody};

use crate::ServiceError;
use crate::accounts::Accounts;
use crate::e2ee::E2ee;
use crate::notifier::Notifier;
use crate::presence::Presence;
use crate::rooms::Rooms;
use crate::to_device::ToDevice;

pub const TABLES: TableScope =
    TableScope { owner: "federation", tables: &[Table::FederationTransactions, Table::FederationRefetches] };

/// What federation needs once it is on: other servers' keys (and through them the client) and
/// the outbound queues.
struct Remote {
    keys: Arc<KeyCache>,
    sender: Arc<Sender>,
}

pub struct Federation {
    kv: Arc<dyn KvStore>,
    /// The whole store, to give the sender its own scoped view and sequence when federation is
    /// turned on.
    store: Arc<dyn KvStore>,
    rooms: Arc<Rooms>,
    accounts: Arc<Accounts>,
    /// Keys other servers ask for, and the device-list changes of their users.
    e2ee: Arc<E2ee>,
    /// Where other servers' to-device messages go.
    to_device: Arc<ToDevice>,
    /// Where other servers' users' presence goes.
    presence: Arc<Presence>,
    notifier: Arc<Notifier>,
    remote: OnceLock<Remote>,
    /// Other servers' space summaries, for `/hierarchy` walks (`hierarchy.rs`).
    hierarchy_cache: hierarchy::RemoteSummaries,
    /// The device-list resyncs pending or running (`device_lists.rs`).
    resyncs: Arc<device_lists::Resyncs>,
    /// Pushed PDUs refused because a fetch they needed failed, tried again later (`refetch.rs`).
    refetches: refetch::Refetches,
}

/// The services federation hands other servers' requests to, besides the rooms.
pub(crate) struct FederationNeighbours {
    pub accounts: Arc<Accounts>,
    pub e2ee: Arc<E2ee>,
    pub to_device: Arc<ToDevice>,
    pub presence: Arc<Presence>,
    pub notifier: Arc<Notifier>,
}

impl Federation {
    pub(crate) fn new(store: Arc<dyn KvStore>, rooms: Arc<Rooms>, neighbours: FederationNeighbours) -> Self {
        let FederationNeighbours { accounts, e2ee, to_device, presence, notifier } = neighbours;
        Self {
            kv: ScopedStore::new(store.clone(), TABLES),
            store,
            rooms,
            accounts,
            e2ee,
            to_device,
            presence,
            notifier,
            remote: OnceLock::new(),
            hierarchy_cache: Default::default(),
            resyncs: Default::default(),
            refetches: Default::default(),
        }
    }

    /// Turns federation on (once; later calls change nothing) and resumes the queues left
    /// from before a restart. A destination unreachable for `catch_up_after` is later caught up
    /// with the newest event of each room. Run [`Federation::forward_forever`] beside it.
    pub async fn enable(&self, keys: Arc<KeyCache>, catch_up_after: Duration) -> Result<(), ServiceError> {
        let sender_kv: Arc<dyn KvStore> = ScopedStore::new(self.store.clone(), lattice_federation::sender::TABLES);
        let sequence = StreamPositions::new(self.store.clone(), "federation.outbox");
        let sender = Sender::new(sender_kv, keys.client().clone(), sequence, catch_up_after);
        if self.remote.set(Remote { keys, sender: sender.clone() }).is_ok() {
            let resumed = sender.resume().await?;
            if resumed > 0 {
                tracing::info!(destinations = resumed, "resumed federation queues");
            }
        }
        Ok(())
    }

    /// Stops the outbound queues' workers (at shutdown).
    pub fn stop(&self) {
        if let Some(remote) = self.remote.get() {
            remote.sender.stop();
        }
    }

    /// The outbound client, when federation is on (media fetches stream through it).
    pub(crate) fn client(&self) -> Option<Arc<lattice_federation::FederationClient>> {
        self.remote.get().map(|remote| remote.keys.client().clone())
    }

    pub fn is_enabled(&self) -> bool {
        self.remote.get().is_some()
    }

    /// `origin` sent a request that verified: it is up, so what is queued for it goes now.
    pub fn heard_from(&self, origin: &ServerName) {
        if let Some(remote) = self.remote.get() {
            remote.sender.heard_from(origin);
        }
    }

    fn remote(&self) -> Result<&Remote, ServiceError> {
        self.remote.get().ok_or_else(|| ServiceError::NotFound("federation is not enabled on this server".into()))
    }

    fn now_ms(&self) -> u64 {
        self.remote.get().map_or(0, |remote| remote.keys.client().clock().now_ms())
    }

    fn server_name(&self) -> &ruma::ServerName {
        self.rooms.server_name()
    }

    /// How many PDUs wait to be sent to `destination` (for tests and operators).
    pub async fn queued_for(&self, destination: &ruma::ServerName) -> Result<usize, ServiceError> {
        Ok(self.remote()?.sender.queued(destination).await?)
    }

    /// The public keys that must have signed `object`: of the servers the spec requires for
    /// its room version, each key the event names that is valid for its timestamp (fetched when
    /// not known). Missing keys are simply absent: verification then fails with the reason.
    async fn keys_for(
        &self,
        object: &CanonicalJsonObject,
        version: &RoomVersion,
    ) -> Result<PublicKeyMap, ServiceError> {
        let keys = &self.remote()?.keys;
        let servers = ruma::signatures::required_server_signatures_to_verify_event(object, &version.rules().signatures)
            .map_err(|e| ServiceError::BadJson(format!("event signatures: {e}")))?;
        let sent_at = match object.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
            _ => 0,
        };
        let signatures = match object.get("signatures") {
            Some(CanonicalJsonValue::Object(signatures)) => signatures,
            _ => return Err(ServiceError::BadJson("event has no signatures".into())),
        };
        let mut map = PublicKeyMap::new();
        for server in servers {
            let Some(CanonicalJsonValue::Object(by_key)) = signatures.get(server.as_str()) else { continue };
            for key_id in by_key.keys().filter(|id| id.starts_with("ed25519:")) {
                let found = keys.event_key(&server, key_id, sent_at, version.rules().enforce_key_validity).await;
                match found {
                    Ok(Some(key)) => {
                        let Ok(key) = ruma::serde::Base64::parse(key) else { continue };
                        map.entry(server.to_string()).or_default().insert(key_id.clone(), key);
                    }
                    Ok(None) => {}
                    Err(error) => tracing::info!(%server, %key_id, %error, "no key to verify an event"),
                }
            }
        }
        Ok(map)
    }
}

/// A server name from a user ID or room ID string, when it has one.
fn server_of(id: &str) -> Option<OwnedServerName> {
    let (_, server) = id.split_once(':')?;
    OwnedServerName::try_from(server).ok()
}
