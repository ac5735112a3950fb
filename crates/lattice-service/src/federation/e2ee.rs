//! End-to-end encryption across servers. Inbound: other servers ask for this server's users'
//! keys (`/user/keys/query`, `/user/keys/claim`, `/user/devices`), send to-device messages
//! (`m.direct_to_device`) and report their users' device-list changes (`m.device_list_update`,
//! `m.signing_key_update`, handled in `device_lists.rs`). Outbound: the same, asked of other
//! servers for local clients.
//!
//! Other servers' users' device lists are cached for the users who share a room with a local
//! user (`device_lists.rs`): a client's `/keys/query` asks a user's server only when the list is
//! not cached or stale.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::Method;
use lattice_core::limits::{MAX_DEVICES_PER_USER, MAX_KEYS_REQUEST_TARGETS};
use lattice_federation::client::Auth;
use lattice_storage::WriteBatch;
use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, parse};
use crate::ServiceError;
use crate::e2ee::{ClaimedKeys, ListUpdate, PublishedChange, QueriedKeys};
use crate::to_device::{RecipientDevices, ToDeviceMessages};

/// The longest a client's key query or claim waits for other servers (the spec's default
/// `timeout` is 10 s).
pub const MAX_REMOTE_KEYS_WAIT: Duration = Duration::from_secs(10);
/// Keys answers are bounded: 1,000 users of 1,000 devices would not fit in 4 MiB.
const MAX_KEYS_RESPONSE_BYTES: usize = 16 * MAX_SMALL_RESPONSE_BYTES;

/// Servers that could not answer for their users' keys: server name → what went wrong.
pub type RemoteFailures = BTreeMap<String, Value>;

#[derive(Deserialize)]
struct KeysQuery {
    device_keys: BTreeMap<OwnedUserId, Vec<String>>,
}

#[derive(Deserialize)]
struct KeysClaim {
    one_time_keys: BTreeMap<OwnedUserId, BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct ToDeviceEdu {
    sender: OwnedUserId,
    #[serde(rename = "type")]
    event_type: String,
    message_id: String,
    messages: ToDeviceMessages,
}

impl Federation {
    /// `POST /_matrix/federation/v1/user/keys/query`: this server's users' device keys and
    /// master and self-signing keys, with their owners' signatures only. Device display names
    /// are not shared with other servers (as Synapse does by default: they can say more than
    /// users expect, "Alice's work laptop"). Other servers' users are ignored.
    pub async fn user_keys_query(&self, origin: &ServerName, body: &[u8]) -> Result<Value, ServiceError> {
        let query: KeysQuery = parse_body(body)?;
        if query.device_keys.len() > MAX_KEYS_REQUEST_TARGETS {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_KEYS_REQUEST_TARGETS} users per query")));
        }
        let local: BTreeMap<OwnedUserId, Vec<String>> =
            query.device_keys.into_iter().filter(|(user, _)| user.server_name() == self.server_name()).collect();
        tracing::debug!(%origin, users = local.len(), "keys query from another server");
        let found = self.e2ee.query_keys(None, &local).await?;
        Ok(json!({
            "device_keys": found.device_keys,
            "master_keys": found.master_keys,
            "self_signing_keys": found.self_signing_keys,
        }))
    }

    /// `POST /_matrix/federation/v1/user/keys/claim`: one key per named device of this server's
    /// users, as a local claim takes it.
    pub async fn user_keys_claim(&self, origin: &ServerName, body: &[u8]) -> Result<Value, ServiceError> {
        let claim: KeysClaim = parse_body(body)?;
        let devices: usize = claim.one_time_keys.values().map(BTreeMap::len).sum();
        if devices > MAX_KEYS_REQUEST_TARGETS {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_KEYS_REQUEST_TARGETS} devices per claim")));
        }
        let local: BTreeMap<OwnedUserId, BTreeMap<String, String>> =
            claim.one_time_keys.into_iter().filter(|(user, _)| user.server_name() == self.server_name()).collect();
        tracing::debug!(%origin, devices, "keys claim from another server");
        Ok(json!({ "one_time_keys": self.e2ee.claim_keys(&local).await? }))
    }

    /// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's whole device list
    /// (devices with their keys, without display names), its latest `stream_id`, and the
    /// master and self-signing keys. A server resyncs with this when it sees a gap in the
    /// updates.
    pub async fn user_devices(&self, origin: &ServerName, user_id: &UserId) -> Result<Value, ServiceError> {
        if user_id.server_name() != self.server_name() {
            return Err(ServiceError::InvalidParam(format!("{user_id} is not a user of this server")));
        }
        tracing::debug!(%origin, %user_id, "device list asked for by another server");
        let mut keys = self.e2ee.device_keys(user_id, &[]).await?;
        let mut devices = Vec::new();
        for device in self.accounts.devices(user_id).await?.into_iter().take(MAX_DEVICES_PER_USER) {
            let mut entry = Map::new();
            entry.insert("device_id".into(), json!(device.device_id));
            if let Some(keys) = keys.remove(&device.device_id) {
                entry.insert("keys".into(), Value::Object(keys));
            }
            devices.push(Value::Object(entry));
        }
        let mut answer = json!({
            "user_id": user_id,
            "stream_id": self.e2ee.device_list_latest(user_id).await?.unwrap_or(0),
            "devices": devices,
        });
        let cross_signing = self.e2ee.query_keys(None, &BTreeMap::from([(user_id.to_owned(), Vec::new())])).await?;
        if let Some(master) = cross_signing.master_keys.get(user_id) {
            answer["master_key"] = Value::Object(master.clone());
        }
        if let Some(self_signing) = cross_signing.self_signing_keys.get(user_id) {
            answer["self_signing_key"] = Value::Object(self_signing.clone());
        }
        Ok(answer)
    }

    /// An `m.direct_to_device` EDU: messages from one of the origin's users to local devices,
    /// delivered once (a repeated `message_id` from the same sender is dropped).
    pub(super) async fn receive_to_device(&self, origin: &ServerName, content: Value) -> Result<(), String> {
        let edu: ToDeviceEdu = serde_json::from_value(content).map_err(|e| format!("m.direct_to_device: {e}"))?;
        if edu.sender.server_name() != origin {
            return Err(format!("{origin} cannot speak for {}", edu.sender));
        }
        if edu.message_id.is_empty() || edu.message_id.len() > lattice_core::limits::MAX_MESSAGE_ID_BYTES {
            return Err("m.direct_to_device: invalid message_id".into());
        }
        let mut devices = RecipientDevices::new();
        for user in edu.messages.keys().filter(|user| user.server_name() == self.server_name()) {
            devices.insert(user.clone(), self.accounts.device_ids(user).await.map_err(|e| e.to_string())?);
        }
        // The transaction mark of a remote sender has no device: theirs are not this server's.
        self.to_device
            .send(&edu.sender, "", &edu.event_type, &edu.message_id, &edu.messages, &devices)
            .await
            .map_err(|e| e.to_string())
    }

    /// Asks each server named in `targets` for its users' keys, all at once, waiting at most
    /// `wait`. Device keys that are not the named user's and device, and cross-signing keys
    /// of other users, are dropped. Servers that fail or do not answer in time are listed.
    pub(crate) async fn query_remote_keys(
        &self,
        targets: BTreeMap<OwnedUserId, Vec<String>>,
        wait: Duration,
    ) -> (QueriedKeys, RemoteFailures) {
        let answers = self
            .ask_each_server(
                targets,
                wait,
                "/_matrix/federation/v1/user/keys/query",
                |users| json!({ "device_keys": users }),
            )
            .await;
        let mut found = QueriedKeys::default();
        let mut failures = RemoteFailures::new();
        for (server, answer) in answers {
            match answer {
                Ok(answer) => merge_queried(&server, &answer, &mut found),
                Err(error) => {
                    failures.insert(server.to_string(), error);
                }
            }
        }
        (found, failures)
    }

    /// Claims one key of each named remote device from its server (see
    /// [`Federation::query_remote_keys`] for the waiting and failures).
    pub(crate) async fn claim_remote_keys(
        &self,
        targets: BTreeMap<OwnedUserId, BTreeMap<String, String>>,
        wait: Duration,
    ) -> (ClaimedKeys, RemoteFailures) {
        let answers = self
            .ask_each_server(
                targets,
                wait,
                "/_matrix/federation/v1/user/keys/claim",
                |users| json!({ "one_time_keys": users }),
            )
            .await;
        let mut claimed = ClaimedKeys::new();
        let mut failures = RemoteFailures::new();
        for (server, answer) in answers {
            match answer {
                Ok(answer) => {
                    let Some(users) = answer["one_time_keys"].as_object() else { continue };
                    for (user, devices) in users {
                        let Some(user) = user_of(&server, user) else { continue };
                        let Ok(devices) = serde_json::from_value(devices.clone()) else { continue };
                        claimed.insert(user, devices);
                    }
                }
                Err(error) => {
                    failures.insert(server.to_string(), error);
                }
            }
        }
        (claimed, failures)
    }

    /// Posts each server its share of `targets` (built by `body`) concurrently; every answer
    /// or failure, at most `wait` after the start.
    async fn ask_each_server<T: serde::Serialize + Send + 'static>(
        &self,
        targets: BTreeMap<OwnedUserId, T>,
        wait: Duration,
        path: &'static str,
        body: impl Fn(BTreeMap<OwnedUserId, T>) -> Value,
    ) -> Vec<(OwnedServerName, Result<Value, Value>)> {
        let mut by_server: BTreeMap<OwnedServerName, BTreeMap<OwnedUserId, T>> = BTreeMap::new();
        for (user, wanted) in targets {
            by_server.entry(user.server_name().to_owned()).or_default().insert(user, wanted);
        }
        let Ok(remote) = self.remote() else {
            let off = json!({ "status": 404, "message": "federation is not enabled on this server" });
            return by_server.into_keys().map(|server| (server, Err(off.clone()))).collect();
        };
        let mut requests = tokio::task::JoinSet::new();
        for (server, users) in by_server {
            let client = remote.keys.client().clone();
            let body = body(users);
            requests.spawn(async move {
                let asked =
                    client.request(&server, Method::POST, path, Some(&body), Auth::Signed, MAX_KEYS_RESPONSE_BYTES);
                let answer = match tokio::time::timeout(wait, asked).await {
                    Err(_) => Err(json!({ "status": 504, "message": "the server did not answer in time" })),
                    Ok(Err(error)) => Err(json!({ "status": 503, "message": error.to_string() })),
                    Ok(Ok(bytes)) => {
                        parse::<Value>(&bytes).map_err(|error| json!({ "status": 502, "message": error.to_string() }))
                    }
                };
                (server, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = requests.join_next().await {
            match joined {
                Ok(answer) => answers.push(answer),
                Err(error) => tracing::warn!(%error, "a keys request to another server ended abnormally"),
            }
        }
        answers
    }

    /// Adds, to a batch that also queues local to-device messages, one `m.direct_to_device`
    /// EDU per server for its users' messages. Returns the servers to wake once it is written;
    /// with federation off, other servers' users are skipped.
    pub(crate) async fn queue_to_device(
        &self,
        batch: &mut WriteBatch,
        sender: &UserId,
        event_type: &str,
        messages: &ToDeviceMessages,
    ) -> Result<Vec<OwnedServerName>, ServiceError> {
        let mut by_server: BTreeMap<OwnedServerName, ToDeviceMessages> = BTreeMap::new();
        for (user, devices) in messages.iter().filter(|(user, _)| user.server_name() != self.server_name()) {
            by_server.entry(user.server_name().to_owned()).or_default().insert(user.clone(), devices.clone());
        }
        if by_server.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(remote) = self.remote() else {
            tracing::info!(%sender, "to-device messages for other servers' users dropped: federation is off");
            return Ok(Vec::new());
        };
        for (server, messages) in &by_server {
            let edu = json!({
                "edu_type": "m.direct_to_device",
                "content": {
                    "sender": sender,
                    "type": event_type,
                    "message_id": crate::secrets::random_alphanumeric(24),
                    "messages": messages,
                },
            });
            remote.sender.queue_edu(batch, std::slice::from_ref(server), &edu.to_string()).await?;
        }
        Ok(by_server.into_keys().collect())
    }

    /// Starts (or nudges) the queues of `destinations` after their rows were written.
    pub(crate) fn wake(&self, destinations: &[OwnedServerName]) {
        if let Ok(remote) = self.remote()
            && !destinations.is_empty()
        {
            remote.sender.wake(destinations);
        }
    }

    /// Tells every server that shares a room with a changed local user what changed:
    /// `m.device_list_update` per device (its keys, or `deleted`), with the change's position as
    /// `stream_id` and the user's previous one as `prev_id`, and `m.signing_key_update` for
    /// cross-signing keys. Written to the durable queues; a server that misses one (a crash
    /// between the change and this) sees the gap in `prev_id` next time and asks
    /// `/user/devices`.
    pub(crate) async fn announce_device_list(&self, change: &PublishedChange) -> Result<(), ServiceError> {
        let Ok(remote) = self.remote() else { return Ok(()) };
        let mut batch = WriteBatch::new();
        let mut woken = BTreeSet::new();
        for update in &change.updates {
            let user = update.user();
            if user.server_name() != self.server_name() {
                continue;
            }
            let Some(edu) = self.device_list_edu(update, change).await? else { continue };
            let destinations = self.servers_sharing_a_room_with(user).await?;
            if destinations.is_empty() {
                continue;
            }
            remote.sender.queue_edu(&mut batch, &destinations, &edu.to_string()).await?;
            woken.extend(destinations);
        }
        if woken.is_empty() {
            return Ok(());
        }
        remote.sender.commit(batch).await?;
        remote.sender.wake(&woken.into_iter().collect::<Vec<_>>());
        Ok(())
    }

    async fn device_list_edu(
        &self,
        update: &ListUpdate,
        change: &PublishedChange,
    ) -> Result<Option<Value>, ServiceError> {
        let user = update.user();
        let prev_id: Vec<u64> = change.previous.get(user).copied().into_iter().collect();
        let device_update = |device_id: &str, keys: Option<Map<String, Value>>| {
            let mut content = json!({
                "user_id": user,
                "device_id": device_id,
                "stream_id": change.position,
                "prev_id": prev_id,
                "deleted": keys.is_none(),
            });
            if let Some(keys) = keys {
                content["keys"] = Value::Object(keys);
            }
            json!({ "edu_type": "m.device_list_update", "content": content })
        };
        Ok(match update {
            ListUpdate::Device { device_id, .. } => {
                let mut keys = self.e2ee.device_keys(user, std::slice::from_ref(device_id)).await?;
                Some(device_update(device_id, keys.remove(device_id)))
            }
            ListUpdate::Deleted { device_id, .. } => Some(device_update(device_id, None)),
            ListUpdate::CrossSigning { .. } => {
                let keys = self.e2ee.query_keys(None, &BTreeMap::from([(user.to_owned(), Vec::new())])).await?;
                let mut content = json!({ "user_id": user });
                if let Some(master) = keys.master_keys.get(user) {
                    content["master_key"] = Value::Object(master.clone());
                }
                if let Some(self_signing) = keys.self_signing_keys.get(user) {
                    content["self_signing_key"] = Value::Object(self_signing.clone());
                }
                Some(json!({ "edu_type": "m.signing_key_update", "content": content }))
            }
            ListUpdate::Quiet { .. } => None,
        })
    }

    /// The other servers with a member in a room the user is joined to.
    pub(super) async fn servers_sharing_a_room_with(
        &self,
        user: &UserId,
    ) -> Result<Vec<OwnedServerName>, ServiceError> {
        let mut servers = BTreeSet::new();
        for room in self.rooms.joined_rooms(user).await? {
            servers.extend(self.rooms.joined_servers(&room).await?);
        }
        servers.remove(self.server_name());
        Ok(servers.into_iter().collect())
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(body).map_err(|e| ServiceError::BadJson(e.to_string()))
}

/// A user ID from another server's answer, only if it is one of that server's users.
fn user_of(server: &ServerName, user: &str) -> Option<OwnedUserId> {
    OwnedUserId::try_from(user).ok().filter(|user| user.server_name() == server)
}

/// Adds what `server` answered to a keys query: only its own users' keys, each device's keys
/// only if they name that user and device, each cross-signing key only if it names that user.
/// (The keys' signatures are for clients to check: they trust a key only once it verifies.)
fn merge_queried(server: &ServerName, answer: &Value, found: &mut QueriedKeys) {
    if let Some(users) = answer["device_keys"].as_object() {
        for (user, devices) in users {
            let (Some(user), Some(devices)) = (user_of(server, user), devices.as_object()) else { continue };
            let mut kept = BTreeMap::new();
            for (device_id, keys) in devices.iter().take(MAX_DEVICES_PER_USER) {
                let Some(keys) = keys.as_object() else { continue };
                if keys.get("user_id").and_then(Value::as_str) == Some(user.as_str())
                    && keys.get("device_id").and_then(Value::as_str) == Some(device_id.as_str())
                {
                    kept.insert(device_id.clone(), keys.clone());
                }
            }
            found.device_keys.insert(user, kept);
        }
    }
    for (field, into) in [("master_keys", &mut found.master_keys), ("self_signing_keys", &mut found.self_signing_keys)]
    {
        let Some(users) = answer[field].as_object() else { continue };
        for (user, key) in users {
            let (Some(user), Some(key)) = (user_of(server, user), key.as_object()) else { continue };
            if key.get("user_id").and_then(Value::as_str) == Some(user.as_str()) {
                into.insert(user, key.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_answers_only_for_its_own_users_and_their_own_devices() {
        let server: OwnedServerName = "remote.test".try_into().expect("server name");
        let answer = json!({
            "device_keys": {
                "@bob:remote.test": {
                    "BOBPHONE": { "user_id": "@bob:remote.test", "device_id": "BOBPHONE", "keys": {} },
                    "FORGED": { "user_id": "@bob:remote.test", "device_id": "OTHER", "keys": {} },
                    "ALICE": { "user_id": "@alice:lattice.test", "device_id": "ALICE", "keys": {} },
                },
                "@alice:lattice.test": {
                    "ALICE": { "user_id": "@alice:lattice.test", "device_id": "ALICE", "keys": {} },
                },
            },
            "master_keys": {
                "@bob:remote.test": { "user_id": "@bob:remote.test", "usage": ["master"], "keys": {} },
                "@carol:remote.test": { "user_id": "@bob:remote.test", "usage": ["master"], "keys": {} },
                "@alice:lattice.test": { "user_id": "@alice:lattice.test", "usage": ["master"], "keys": {} },
            },
        });
        let mut found = QueriedKeys::default();
        merge_queried(&server, &answer, &mut found);
        let bob: OwnedUserId = "@bob:remote.test".try_into().expect("user");
        assert_eq!(found.device_keys.len(), 1);
        assert_eq!(found.device_keys[&bob].keys().collect::<Vec<_>>(), ["BOBPHONE"]);
        assert_eq!(found.master_keys.keys().collect::<Vec<_>>(), [&bob]);
        assert!(found.self_signing_keys.is_empty());
    }
}
