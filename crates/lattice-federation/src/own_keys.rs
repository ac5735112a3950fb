//! This server's signing keys as other servers see them: the current key (signs requests,
//! events and the key document) and the old keys it used before a rotation (still listed, with
//! the time they stopped being used, so events signed with them stay verifiable).

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ruma::signatures::Ed25519KeyPair;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName};

use crate::error::{FederationError, Result};

/// A key this server no longer signs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldVerifyKey {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded base64 of the public key.
    pub public_key: String,
    /// When the key stopped being used (ms since the epoch).
    pub expired_ts: u64,
}

pub struct OwnKeys {
    server_name: OwnedServerName,
    current: Arc<Ed25519KeyPair>,
    old: Vec<OldVerifyKey>,
    /// How far ahead `valid_until_ts` of the published key document lies.
    valid_for_ms: u64,
}

/// Upper bound on the old keys published (a key document must stay small).
pub const MAX_OLD_VERIFY_KEYS: usize = 100;

impl OwnKeys {
    pub fn new(
        server_name: OwnedServerName,
        current: Arc<Ed25519KeyPair>,
        mut old: Vec<OldVerifyKey>,
        valid_for_ms: u64,
    ) -> Result<Self> {
        let current_id = format!("ed25519:{}", current.version());
        // A crash between the two writes of a rotation can list the current key as old too.
        old.retain(|key| key.key_id != current_id);
        if old.len() > MAX_OLD_VERIFY_KEYS {
            return Err(FederationError::Invalid(format!("more than {MAX_OLD_VERIFY_KEYS} old signing keys")));
        }
        Ok(Self { server_name, current, old, valid_for_ms })
    }

    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.current
    }

    /// `ed25519:<version>` of the current key.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.current.version())
    }

    pub fn public_key(&self) -> String {
        STANDARD_NO_PAD.encode(self.current.public_key())
    }

    pub fn old_keys(&self) -> &[OldVerifyKey] {
        &self.old
    }

    pub fn valid_for_ms(&self) -> u64 {
        self.valid_for_ms
    }

    /// The public key of `key_id` if it is one of ours and valid for requests (the current one).
    pub fn request_key(&self, key_id: &str) -> Option<String> {
        (key_id == self.key_id()).then(|| self.public_key())
    }

    /// Adds this server's signature to `object` (keeping the signatures already there).
    pub fn sign(&self, object: &mut CanonicalJsonObject) -> Result<()> {
        ruma::signatures::sign_json(self.server_name.as_str(), self.current.as_ref(), object)
            .map_err(|e| FederationError::Invalid(format!("signing JSON: {e}")))
    }

    /// The signed answer of `GET /_matrix/key/v2/server`.
    pub fn key_document(&self, now_ms: u64) -> Result<CanonicalJsonObject> {
        let key = |public_key: &str| {
            CanonicalJsonValue::Object(BTreeMap::from([(
                "key".to_owned(),
                CanonicalJsonValue::String(public_key.to_owned()),
            )]))
        };
        let verify_keys = BTreeMap::from([(self.key_id(), key(&self.public_key()))]);
        let old_verify_keys: BTreeMap<String, CanonicalJsonValue> = self
            .old
            .iter()
            .map(|old| {
                let mut entry =
                    BTreeMap::from([("key".to_owned(), CanonicalJsonValue::String(old.public_key.clone()))]);
                entry.insert("expired_ts".to_owned(), integer(old.expired_ts));
                (old.key_id.clone(), CanonicalJsonValue::Object(entry))
            })
            .collect();
        let mut document = CanonicalJsonObject::from([
            ("server_name".to_owned(), CanonicalJsonValue::String(self.server_name.to_string())),
            ("verify_keys".to_owned(), CanonicalJsonValue::Object(verify_keys)),
            ("old_verify_keys".to_owned(), CanonicalJsonValue::Object(old_verify_keys)),
            ("valid_until_ts".to_owned(), integer(now_ms.saturating_add(self.valid_for_ms))),
        ]);
        self.sign(&mut document)?;
        Ok(document)
    }
}

/// A timestamp as canonical JSON (which allows integers up to 2^53 - 1).
pub(crate) fn integer(value: u64) -> CanonicalJsonValue {
    let clamped = value.min((1u64 << 53) - 1);
    CanonicalJsonValue::Integer(ruma::Int::try_from(clamped).unwrap_or(ruma::Int::MAX))
}
