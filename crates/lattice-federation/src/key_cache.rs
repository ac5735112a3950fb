//! Other servers' signing keys: fetched from the server itself (`GET /_matrix/key/v2/server`),
//! else through the configured notaries (`POST /_matrix/key/v2/query`), checked (the document's
//! `server_name`, a valid self-signature by every key it lists, the notary's signature),
//! stored in the `server_keys` table and kept in a bounded memory cache. Also the notary side:
//! answering other servers' queries from the store or by fetching, countersigned by this
//! server.
//!
//! Validity: a key listed in `verify_keys` is valid until the lesser of the document's
//! `valid_until_ts` and seven days after it was fetched (the spec's cap). A key listed in
//! `old_verify_keys` verifies only events sent before its `expired_ts`, never requests.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use http::Method;
use lattice_storage::{KvStore, Record, ScopedStore, Table, TableScope, WriteBatch};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName, SigningKeyAlgorithm};
use serde::{Deserialize, Serialize};

use crate::bounded::BoundedMap;
use crate::client::{Auth, FederationClient};
use crate::error::{FederationError, Result};
use crate::own_keys::OwnKeys;

/// The tables the key cache owns: it reaches the store only through a scope of these.
pub const TABLES: TableScope = TableScope { owner: "federation keys", tables: &[Table::ServerKeys] };

/// The largest key document (or notary answer) read.
pub const MAX_KEY_RESPONSE_BYTES: usize = 512 * 1024;
/// The spec's cap on how long a fetched key counts as valid, whatever `valid_until_ts` says.
pub const MAX_VALIDITY_AHEAD_MS: u64 = 7 * 24 * 3600 * 1000;
/// One server's keys are fetched at most this often, however many requests name unknown keys.
pub const MIN_REFETCH_MS: u64 = 1_000;
/// Keys kept in memory.
pub const MEMORY_KEYS: usize = 10_000;
/// Servers whose last fetch time is remembered.
const FETCH_TIMES: usize = 10_000;
/// Keys (current plus old) one document may list.
pub const MAX_KEYS_PER_DOCUMENT: usize = 100;
/// Longest key ID accepted.
pub const MAX_KEY_ID_LEN: usize = 128;
/// Servers one notary query may ask about.
pub const MAX_QUERY_SERVERS: usize = 20;
/// Fetches of different servers run in parallel up to this many stripes; fetches of one
/// server queue behind each other (and then find the keys already fetched).
const FETCH_STRIPES: usize = 64;

/// One key of one server, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// Unpadded base64 of the ed25519 public key.
    pub key: String,
    /// The key verifies requests and events up to this time (ms).
    pub valid_until_ms: u64,
    /// Set once the server lists the key in `old_verify_keys`: events before this time only.
    pub expired_ms: Option<u64>,
}

impl Record for StoredKey {
    const TABLE: Table = Table::ServerKeys;
}

impl StoredKey {
    /// May this key verify a request made at `now_ms`?
    pub fn valid_for_request(&self, now_ms: u64) -> bool {
        self.expired_ms.is_none() && self.valid_until_ms >= now_ms
    }

    /// May this key verify an event sent at `origin_server_ts`? Room versions 1–4 ignore
    /// `valid_until_ts` (`enforce_valid_until` false); later ones require the event to lie
    /// within it. An old key verifies only events sent before it expired.
    pub fn valid_for_event(&self, origin_server_ts: u64, enforce_valid_until: bool) -> bool {
        if let Some(expired) = self.expired_ms {
            return origin_server_ts < expired;
        }
        !enforce_valid_until || origin_server_ts <= self.valid_until_ms
    }
}

/// The latest key document a server published, kept verbatim for notary answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredDocument {
    /// The document as canonical JSON, with the signatures it came with.
    document: String,
    valid_until_ts: u64,
    fetched_ms: u64,
}

impl Record for StoredDocument {
    const TABLE: Table = Table::ServerKeys;
}

fn key_row(server: &str, key_id: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(server.len() + 1 + key_id.len());
    row.extend_from_slice(server.as_bytes());
    row.push(0);
    row.extend_from_slice(key_id.as_bytes());
    row
}

fn document_row(server: &str) -> Vec<u8> {
    let mut row = server.as_bytes().to_vec();
    row.push(1);
    row
}

/// A key document that passed every check.
#[derive(Clone, Debug)]
pub struct KeyDocument {
    pub server_name: OwnedServerName,
    /// Key ID → unpadded base64 public key.
    pub verify_keys: BTreeMap<String, String>,
    /// Key ID → (public key, expired_ts).
    pub old_verify_keys: BTreeMap<String, (String, u64)>,
    pub valid_until_ts: u64,
    pub object: CanonicalJsonObject,
}

fn decode_key(text: &str) -> Option<Vec<u8>> {
    let bytes = STANDARD_NO_PAD.decode(text).or_else(|_| STANDARD.decode(text)).ok()?;
    (bytes.len() == 32).then_some(bytes)
}

fn as_u64(value: Option<&CanonicalJsonValue>) -> Option<u64> {
    match value {
        Some(CanonicalJsonValue::Integer(int)) => u64::try_from(i64::from(*int)).ok(),
        _ => None,
    }
}

/// Checks that `signatures[signer]` holds a valid signature of `object` by `key_id`.
fn verify_signature(object: &CanonicalJsonObject, signer: &str, key_id: &str, public_key: &str) -> Result<(), String> {
    let signature = match object.get("signatures") {
        Some(CanonicalJsonValue::Object(signatures)) => match signatures.get(signer) {
            Some(CanonicalJsonValue::Object(by_signer)) => match by_signer.get(key_id) {
                Some(CanonicalJsonValue::String(signature)) => signature.clone(),
                _ => return Err(format!("not signed by {signer} with {key_id}")),
            },
            _ => return Err(format!("not signed by {signer}")),
        },
        _ => return Err("no signatures".to_owned()),
    };
    let signature = STANDARD_NO_PAD
        .decode(&signature)
        .or_else(|_| STANDARD.decode(&signature))
        .map_err(|_| format!("signature {key_id} is not base64"))?;
    let public_key = decode_key(public_key).ok_or_else(|| format!("key {key_id} is not a 32-byte base64 key"))?;
    let canonical = ruma::signatures::to_canonical_json_string_for_signing(object).map_err(|e| e.to_string())?;
    ruma::signatures::verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        &public_key,
        &signature,
        canonical.as_bytes(),
    )
    .map_err(|e| format!("signature {key_id} of {signer} does not verify: {e}"))
}

fn valid_key_id(key_id: &str) -> bool {
    key_id.len() <= MAX_KEY_ID_LEN
        && key_id.strip_prefix("ed25519:").is_some_and(|version| {
            !version.is_empty() && version.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// Checks a `/_matrix/key/v2/server` document of `expected`: its `server_name`, its keys, and
/// a valid signature by each of its `verify_keys`.
pub fn validate_key_document(expected: &ServerName, object: CanonicalJsonObject) -> Result<KeyDocument, String> {
    match object.get("server_name") {
        Some(CanonicalJsonValue::String(name)) if name == expected.as_str() => {}
        Some(CanonicalJsonValue::String(name)) => return Err(format!("document is for {name}, not {expected}")),
        _ => return Err("no server_name".to_owned()),
    }
    let valid_until_ts = as_u64(object.get("valid_until_ts")).ok_or("no valid_until_ts")?;
    let mut verify_keys = BTreeMap::new();
    match object.get("verify_keys") {
        Some(CanonicalJsonValue::Object(keys)) => {
            for (key_id, entry) in keys {
                // Unknown algorithms are skipped: this server can verify ed25519 only.
                if !key_id.starts_with("ed25519:") {
                    continue;
                }
                if !valid_key_id(key_id) {
                    return Err(format!("invalid key ID {key_id:?}"));
                }
                let key = match entry {
                    CanonicalJsonValue::Object(entry) => match entry.get("key") {
                        Some(CanonicalJsonValue::String(key)) if decode_key(key).is_some() => key.clone(),
                        _ => return Err(format!("verify key {key_id} is not a base64 ed25519 key")),
                    },
                    _ => return Err(format!("verify key {key_id} is not an object")),
                };
                verify_keys.insert(key_id.clone(), key);
            }
        }
        _ => return Err("no verify_keys".to_owned()),
    }
    if verify_keys.is_empty() {
        return Err("no ed25519 verify key".to_owned());
    }
    let mut old_verify_keys = BTreeMap::new();
    match object.get("old_verify_keys") {
        None => {}
        Some(CanonicalJsonValue::Object(keys)) => {
            for (key_id, entry) in keys {
                if !key_id.starts_with("ed25519:") {
                    continue;
                }
                if !valid_key_id(key_id) {
                    return Err(format!("invalid old key ID {key_id:?}"));
                }
                let CanonicalJsonValue::Object(entry) = entry else {
                    return Err(format!("old verify key {key_id} is not an object"));
                };
                let key = match entry.get("key") {
                    Some(CanonicalJsonValue::String(key)) if decode_key(key).is_some() => key.clone(),
                    _ => return Err(format!("old verify key {key_id} is not a base64 ed25519 key")),
                };
                let expired_ts =
                    as_u64(entry.get("expired_ts")).ok_or(format!("old key {key_id} has no expired_ts"))?;
                old_verify_keys.insert(key_id.clone(), (key, expired_ts));
            }
        }
        Some(_) => return Err("old_verify_keys is not an object".to_owned()),
    }
    if verify_keys.len() + old_verify_keys.len() > MAX_KEYS_PER_DOCUMENT {
        return Err(format!("more than {MAX_KEYS_PER_DOCUMENT} keys"));
    }
    for (key_id, key) in &verify_keys {
        verify_signature(&object, expected.as_str(), key_id, key)?;
    }
    Ok(KeyDocument { server_name: expected.to_owned(), verify_keys, old_verify_keys, valid_until_ts, object })
}

fn parse_object(bytes: &[u8]) -> Result<CanonicalJsonObject, String> {
    serde_json::from_slice::<CanonicalJsonObject>(bytes).map_err(|e| format!("not a canonical JSON object: {e}"))
}

pub struct KeyCache {
    kv: Arc<dyn KvStore>,
    client: Arc<FederationClient>,
    own: Arc<OwnKeys>,
    notaries: Vec<OwnedServerName>,
    memory: Mutex<BoundedMap<(String, String), StoredKey>>,
    last_fetch: Mutex<BoundedMap<String, u64>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl KeyCache {
    /// `notaries`: the servers asked when a server cannot be reached directly
    /// (`[federation] trusted_key_servers`).
    pub fn new(kv: Arc<dyn KvStore>, client: Arc<FederationClient>, notaries: Vec<OwnedServerName>) -> Self {
        let own = client.own_keys().clone();
        Self {
            kv: ScopedStore::new(kv, TABLES),
            client,
            own,
            notaries,
            memory: Mutex::new(BoundedMap::new(MEMORY_KEYS)),
            last_fetch: Mutex::new(BoundedMap::new(FETCH_TIMES)),
            stripes: (0..FETCH_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    pub fn own_keys(&self) -> &Arc<OwnKeys> {
        &self.own
    }

    pub fn client(&self) -> &Arc<FederationClient> {
        &self.client
    }

    fn now_ms(&self) -> u64 {
        self.client.clock().now_ms()
    }

    /// The stored key `key_id` of `server`, from memory or the store.
    pub async fn stored_key(&self, server: &str, key_id: &str) -> Result<Option<StoredKey>> {
        let cache_key = (server.to_owned(), key_id.to_owned());
        if let Some(key) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&cache_key) {
            return Ok(Some(key.clone()));
        }
        let Some(stored) = lattice_storage::get::<StoredKey>(self.kv.as_ref(), &key_row(server, key_id)).await? else {
            return Ok(None);
        };
        let now = self.now_ms();
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(cache_key, stored.value.clone(), now);
        Ok(Some(stored.value))
    }

    /// The public key (unpadded base64) `key_id` of `origin`, valid for a request now: from the
    /// cache, else fetched. Unknown, expired or old keys are [`FederationError::Unauthorized`].
    pub async fn request_key(&self, origin: &ServerName, key_id: &str) -> Result<String> {
        if origin.as_str() == self.own.server_name().as_str() {
            return self
                .own
                .request_key(key_id)
                .ok_or_else(|| FederationError::Unauthorized(format!("{key_id} is not a current key of {origin}")));
        }
        if let Some(key) = self.stored_key(origin.as_str(), key_id).await?
            && key.valid_for_request(self.now_ms())
        {
            return Ok(key.key);
        }
        if let Err(error) = self.refresh(origin).await {
            tracing::info!(server = %origin, %error, "fetching server keys failed");
        }
        match self.stored_key(origin.as_str(), key_id).await? {
            Some(key) if key.valid_for_request(self.now_ms()) => Ok(key.key),
            Some(_) => {
                Err(FederationError::Unauthorized(format!("key {key_id} of {origin} is expired or no longer in use")))
            }
            None => Err(FederationError::Unauthorized(format!("unknown key {key_id} of {origin}"))),
        }
    }

    /// The key `key_id` of `server` if it may verify an event sent at `origin_server_ts`
    /// (fetched when unknown or not valid that long).
    pub async fn event_key(
        &self,
        server: &ServerName,
        key_id: &str,
        origin_server_ts: u64,
        enforce_valid_until: bool,
    ) -> Result<Option<String>> {
        let valid = |key: &Option<StoredKey>| {
            key.as_ref().filter(|k| k.valid_for_event(origin_server_ts, enforce_valid_until)).map(|k| k.key.clone())
        };
        if server.as_str() == self.own.server_name().as_str() {
            if let Some(key) = self.own.request_key(key_id) {
                return Ok(Some(key));
            }
            let old = self.own.old_keys().iter().find(|old| old.key_id == key_id);
            return Ok(old.filter(|old| origin_server_ts < old.expired_ts).map(|old| old.public_key.clone()));
        }
        if let Some(key) = valid(&self.stored_key(server.as_str(), key_id).await?) {
            return Ok(Some(key));
        }
        if let Err(error) = self.refresh(server).await {
            tracing::info!(%server, %error, "fetching server keys failed");
        }
        Ok(valid(&self.stored_key(server.as_str(), key_id).await?))
    }

    fn stripe(&self, server: &str) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        server.hash(&mut hasher);
        &self.stripes[(hasher.finish() as usize) % FETCH_STRIPES]
    }

    /// Fetches and stores `server`'s keys, unless they were fetched within
    /// [`MIN_REFETCH_MS`]; one fetch per server at a time.
    pub async fn refresh(&self, server: &ServerName) -> Result<()> {
        let _one_at_a_time = self.stripe(server.as_str()).lock().await;
        let now = self.now_ms();
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
            if last.get(server.as_str()).is_some_and(|at| now < at.saturating_add(MIN_REFETCH_MS)) {
                return Ok(());
            }
            last.insert(server.to_string(), now, now);
        }
        let document = self.fetch(server).await?;
        self.store(&document).await
    }

    /// Fetches `server`'s key document directly, else from each notary in turn.
    async fn fetch(&self, server: &ServerName) -> Result<KeyDocument> {
        let direct = self.fetch_direct(server).await;
        let direct_error = match direct {
            Ok(document) => return Ok(document),
            Err(error) => error,
        };
        for notary in &self.notaries {
            if notary.as_str() == server.as_str() || notary.as_str() == self.own.server_name().as_str() {
                continue;
            }
            match self.fetch_from_notary(notary, server).await {
                Ok(document) => return Ok(document),
                Err(error) => tracing::info!(%server, %notary, %error, "notary could not give keys"),
            }
        }
        Err(direct_error)
    }

    async fn fetch_direct(&self, server: &ServerName) -> Result<KeyDocument> {
        let bytes = self
            .client
            .request(server, Method::GET, "/_matrix/key/v2/server", None, Auth::Unsigned, MAX_KEY_RESPONSE_BYTES)
            .await?;
        let invalid = |detail: String| FederationError::InvalidResponse { server: server.to_string(), detail };
        let object = parse_object(&bytes).map_err(invalid)?;
        validate_key_document(server, object).map_err(invalid)
    }

    /// The current keys of a notary, fetched from the notary itself (never through another
    /// notary: trust in a notary must not rest on a third server).
    async fn notary_keys(&self, notary: &ServerName) -> Result<BTreeMap<String, String>> {
        let now = self.now_ms();
        let document = self.fetch_direct(notary).await?;
        self.store(&document).await?;
        let valid_until = document.valid_until_ts.min(now.saturating_add(MAX_VALIDITY_AHEAD_MS));
        if valid_until < now {
            return Err(FederationError::InvalidResponse {
                server: notary.to_string(),
                detail: "its own keys have expired".into(),
            });
        }
        Ok(document.verify_keys)
    }

    async fn fetch_from_notary(&self, notary: &ServerName, server: &ServerName) -> Result<KeyDocument> {
        let notary_keys = self.notary_keys(notary).await?;
        let query = serde_json::json!({ "server_keys": { server.as_str(): {} } });
        let bytes = self
            .client
            .request(notary, Method::POST, "/_matrix/key/v2/query", Some(&query), Auth::Signed, MAX_KEY_RESPONSE_BYTES)
            .await?;
        let invalid = |detail: String| FederationError::InvalidResponse { server: notary.to_string(), detail };
        let answer = parse_object(&bytes).map_err(invalid)?;
        let Some(CanonicalJsonValue::Array(documents)) = answer.get("server_keys") else {
            return Err(invalid("no server_keys array".into()));
        };
        let mut best: Option<KeyDocument> = None;
        for document in documents {
            let CanonicalJsonValue::Object(object) = document else { continue };
            if !matches!(object.get("server_name"), Some(CanonicalJsonValue::String(name)) if name == server.as_str()) {
                continue;
            }
            let countersigned =
                notary_keys.iter().any(|(key_id, key)| verify_signature(object, notary.as_str(), key_id, key).is_ok());
            if !countersigned {
                tracing::info!(%notary, %server, "notary answer without a valid notary signature");
                continue;
            }
            match validate_key_document(server, object.clone()) {
                Ok(document) if best.as_ref().is_none_or(|b| document.valid_until_ts > b.valid_until_ts) => {
                    best = Some(document);
                }
                Ok(_) => {}
                Err(error) => tracing::info!(%notary, %server, %error, "notary gave an invalid key document"),
            }
        }
        best.ok_or_else(|| invalid(format!("no valid key document for {server}")))
    }

    /// Stores a checked document: each key, and the document itself for notary answers.
    async fn store(&self, document: &KeyDocument) -> Result<()> {
        let now = self.now_ms();
        let server = document.server_name.as_str();
        let valid_until_ms = document.valid_until_ts.min(now.saturating_add(MAX_VALIDITY_AHEAD_MS));
        let mut rows = Vec::new();
        for (key_id, key) in &document.verify_keys {
            rows.push((key_id.clone(), StoredKey { key: key.clone(), valid_until_ms, expired_ms: None }));
        }
        for (key_id, (key, expired_ts)) in &document.old_verify_keys {
            if document.verify_keys.contains_key(key_id) {
                continue;
            }
            rows.push((
                key_id.clone(),
                StoredKey { key: key.clone(), valid_until_ms: *expired_ts, expired_ms: Some(*expired_ts) },
            ));
        }
        let mut batch = WriteBatch::new();
        for (key_id, stored) in &rows {
            lattice_storage::put(&mut batch, key_row(server, key_id), stored);
        }
        let canonical = serde_json::to_string(&document.object)
            .map_err(|e| FederationError::Invalid(format!("serialising a key document: {e}")))?;
        let stored_document =
            StoredDocument { document: canonical, valid_until_ts: document.valid_until_ts, fetched_ms: now };
        lattice_storage::put(&mut batch, document_row(server), &stored_document);
        self.kv.write(batch).await?;
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        for (key_id, stored) in rows {
            memory.insert((server.to_owned(), key_id), stored, now);
        }
        Ok(())
    }

    async fn stored_document(&self, server: &str) -> Result<Option<StoredDocument>> {
        Ok(lattice_storage::get::<StoredDocument>(self.kv.as_ref(), &document_row(server)).await?.map(|f| f.value))
    }

    /// The notary answer for one server: its key document valid until at least
    /// `minimum_valid_until_ts` when one can be had (stored, else fetched), else the newest
    /// stored one, countersigned by this server; `None` when nothing is known.
    pub async fn notary_document(
        &self,
        server: &ServerName,
        minimum_valid_until_ts: u64,
    ) -> Result<Option<CanonicalJsonObject>> {
        let now = self.now_ms();
        if server.as_str() == self.own.server_name().as_str() {
            return Ok(Some(self.own.key_document(now)?));
        }
        let mut stored = self.stored_document(server.as_str()).await?;
        if stored.as_ref().is_none_or(|s| s.valid_until_ts < minimum_valid_until_ts) {
            match self.refresh(server).await {
                Ok(()) => stored = self.stored_document(server.as_str()).await?,
                Err(error) => tracing::info!(%server, %error, "notary: fetching keys failed; answering from the store"),
            }
        }
        let Some(stored) = stored else { return Ok(None) };
        let mut object = parse_object(stored.document.as_bytes())
            .map_err(|detail| FederationError::Invalid(format!("stored key document of {server}: {detail}")))?;
        self.own.sign(&mut object)?;
        Ok(Some(object))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ruma::signatures::Ed25519KeyPair;

    use super::*;
    use crate::own_keys::OldVerifyKey;

    fn own(name: &str, version: &str, old: Vec<OldVerifyKey>) -> OwnKeys {
        let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.to_owned()).unwrap();
        OwnKeys::new(name.try_into().unwrap(), Arc::new(pair), old, 3_600_000).unwrap()
    }

    fn server(name: &str) -> &ServerName {
        <&ServerName>::try_from(name).unwrap()
    }

    #[test]
    fn a_published_document_validates_with_its_old_keys() {
        let old = OldVerifyKey {
            key_id: "ed25519:old".into(),
            public_key: own("a.test", "x", vec![]).public_key(),
            expired_ts: 500,
        };
        let keys = own("a.test", "cur", vec![old.clone()]);
        let document = validate_key_document(server("a.test"), keys.key_document(1_000).unwrap()).unwrap();
        assert_eq!(document.verify_keys.get("ed25519:cur"), Some(&keys.public_key()));
        assert_eq!(document.old_verify_keys.get("ed25519:old"), Some(&(old.public_key, 500)));
        assert_eq!(document.valid_until_ts, 1_000 + 3_600_000);
    }

    #[test]
    fn documents_that_are_not_what_they_claim_are_refused() {
        let keys = own("a.test", "cur", vec![]);
        let good = keys.key_document(1_000).unwrap();
        assert!(validate_key_document(server("b.test"), good.clone()).is_err(), "another server's document");

        let mut tampered = good.clone();
        tampered.insert("valid_until_ts".into(), crate::own_keys::integer(9_999_999_999));
        assert!(validate_key_document(server("a.test"), tampered).is_err(), "changed after signing");

        let mut unsigned = good.clone();
        unsigned.remove("signatures");
        assert!(validate_key_document(server("a.test"), unsigned).is_err());

        // A second verify key that did not sign the document.
        let mut extra = good.clone();
        if let Some(CanonicalJsonValue::Object(verify)) = extra.get_mut("verify_keys") {
            let other = own("a.test", "other", vec![]).public_key();
            verify.insert(
                "ed25519:other".into(),
                CanonicalJsonValue::Object(BTreeMap::from([("key".into(), CanonicalJsonValue::String(other))])),
            );
        }
        keys.sign(&mut extra).unwrap();
        assert!(validate_key_document(server("a.test"), extra).is_err(), "every verify key must sign");

        let mut bad_key = good;
        if let Some(CanonicalJsonValue::Object(verify)) = bad_key.get_mut("verify_keys") {
            verify.insert(
                "ed25519:cur".into(),
                CanonicalJsonValue::Object(BTreeMap::from([(
                    "key".into(),
                    CanonicalJsonValue::String("short".into()),
                )])),
            );
        }
        assert!(validate_key_document(server("a.test"), bad_key).is_err());
    }

    #[test]
    fn key_validity_for_requests_and_events() {
        let current = StoredKey { key: String::new(), valid_until_ms: 1_000, expired_ms: None };
        let old = StoredKey { key: String::new(), valid_until_ms: 500, expired_ms: Some(500) };
        let cases = [
            (current.valid_for_request(1_000), true),
            (current.valid_for_request(1_001), false),
            (old.valid_for_request(100), false),
            (current.valid_for_event(1_000, true), true),
            (current.valid_for_event(1_001, true), false),
            (current.valid_for_event(5_000, false), true),
            (old.valid_for_event(499, true), true),
            (old.valid_for_event(500, false), false),
        ];
        for (index, (got, expected)) in cases.into_iter().enumerate() {
            assert_eq!(got, expected, "case {index}");
        }
    }
}
