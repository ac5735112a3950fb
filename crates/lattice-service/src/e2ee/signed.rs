//! Pure checks of the signed JSON objects clients publish: device keys, signed one-time keys,
//! cross-signing keys. No I/O: each takes the object and the public key and answers.

use ruma::serde::Base64;
use ruma::signatures::{SigningKeyAlgorithm, to_canonical_json_string_for_signing, verify_canonical_json_bytes};
use serde_json::{Map, Value};

/// Why a signature did not check out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SignatureProblem {
    /// The object carries no signature by that signer and key.
    Missing,
    /// A signature or public key that is not valid base64, or an object that is not canonical JSON.
    Malformed(String),
    /// The signature does not match.
    Invalid,
}

impl SignatureProblem {
    pub(crate) fn describe(&self, signer: &str, key_id: &str) -> String {
        match self {
            SignatureProblem::Missing => format!("no signature by {signer} with {key_id}"),
            SignatureProblem::Malformed(detail) => format!("malformed signed object: {detail}"),
            SignatureProblem::Invalid => format!("the signature by {signer} with {key_id} is invalid"),
        }
    }
}

/// The signature `object.signatures[signer][key_id]`, if there is one.
pub(crate) fn signature<'a>(object: &'a Map<String, Value>, signer: &str, key_id: &str) -> Option<&'a str> {
    object.get("signatures")?.get(signer)?.get(key_id)?.as_str()
}

/// Checks that `object` carries a valid ed25519 signature by `signer` with `key_id`, made with
/// the (unpadded base64) public key `public_key`, over the object's canonical JSON without
/// `signatures` and `unsigned`.
pub(crate) fn verify(
    object: &Map<String, Value>,
    signer: &str,
    key_id: &str,
    public_key: &str,
) -> Result<(), SignatureProblem> {
    let signature = signature(object, signer, key_id).ok_or(SignatureProblem::Missing)?;
    let signature = Base64::<ruma::serde::base64::Standard>::parse(signature)
        .map_err(|e| SignatureProblem::Malformed(format!("signature: {e}")))?;
    let public_key = Base64::<ruma::serde::base64::Standard>::parse(public_key)
        .map_err(|e| SignatureProblem::Malformed(format!("public key: {e}")))?;
    let canonical = ruma::canonical_json::try_from_json_map(object.clone())
        .map_err(|e| SignatureProblem::Malformed(e.to_string()))?;
    let signed =
        to_canonical_json_string_for_signing(&canonical).map_err(|e| SignatureProblem::Malformed(e.to_string()))?;
    verify_canonical_json_bytes(
        &SigningKeyAlgorithm::Ed25519,
        public_key.as_bytes(),
        signature.as_bytes(),
        signed.as_bytes(),
    )
    .map_err(|_| SignatureProblem::Invalid)
}

/// The object without `signatures` and `unsigned`: what a signature covers, so two uploads of the
/// same key with different signatures compare equal.
pub(crate) fn signed_part(object: &Map<String, Value>) -> Map<String, Value> {
    object
        .iter()
        .filter(|(name, _)| *name != "signatures" && *name != "unsigned")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Adds `signatures[signer][key_id] = signature` to `object`.
pub(crate) fn add_signature(object: &mut Map<String, Value>, signer: &str, key_id: &str, signature: Value) {
    let signatures = object.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
    if !signatures.is_object() {
        *signatures = Value::Object(Map::new());
    }
    if let Some(signatures) = signatures.as_object_mut() {
        let by_signer = signatures.entry(signer).or_insert_with(|| Value::Object(Map::new()));
        if !by_signer.is_object() {
            *by_signer = Value::Object(Map::new());
        }
        if let Some(by_signer) = by_signer.as_object_mut() {
            by_signer.insert(key_id.to_owned(), signature);
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::signatures::{Ed25519KeyPair, KeyPair};
    use serde_json::json;

    use super::*;

    fn key_pair(version: &str) -> Ed25519KeyPair {
        let document = Ed25519KeyPair::generate();
        Ed25519KeyPair::from_der(&document, version.to_owned()).expect("a key pair")
    }

    fn public_key(pair: &Ed25519KeyPair) -> String {
        Base64::<ruma::serde::base64::Standard>::new(pair.public_key().to_vec()).encode()
    }

    fn sign(object: &mut Map<String, Value>, signer: &str, pair: &Ed25519KeyPair) {
        let canonical = ruma::canonical_json::try_from_json_map(object.clone()).expect("canonical");
        let text = to_canonical_json_string_for_signing(&canonical).expect("canonical text");
        let signature = pair.sign(text.as_bytes());
        let key_id = format!("ed25519:{}", pair.version());
        add_signature(object, signer, &key_id, json!(signature.base64()));
    }

    #[test]
    fn a_signature_checks_out_and_any_change_breaks_it() {
        let pair = key_pair("DEV");
        let mut object =
            json!({ "user_id": "@a:hs", "device_id": "DEV", "keys": { "ed25519:DEV": public_key(&pair) } })
                .as_object()
                .cloned()
                .expect("an object");
        sign(&mut object, "@a:hs", &pair);
        assert_eq!(verify(&object, "@a:hs", "ed25519:DEV", &public_key(&pair)), Ok(()));
        // `unsigned` is not covered.
        object.insert("unsigned".into(), json!({ "device_display_name": "x" }));
        assert_eq!(verify(&object, "@a:hs", "ed25519:DEV", &public_key(&pair)), Ok(()));
        assert_eq!(verify(&object, "@b:hs", "ed25519:DEV", &public_key(&pair)), Err(SignatureProblem::Missing));
        let other = key_pair("DEV");
        assert_eq!(verify(&object, "@a:hs", "ed25519:DEV", &public_key(&other)), Err(SignatureProblem::Invalid));
        object.insert("device_id".into(), json!("OTHER"));
        assert_eq!(verify(&object, "@a:hs", "ed25519:DEV", &public_key(&pair)), Err(SignatureProblem::Invalid));
        assert!(matches!(verify(&object, "@a:hs", "ed25519:DEV", "not base64!"), Err(SignatureProblem::Malformed(_))));
    }

    #[test]
    fn the_signed_part_leaves_out_signatures_and_unsigned() {
        let object = json!({ "a": 1, "signatures": {}, "unsigned": {} }).as_object().cloned().expect("an object");
        assert_eq!(Value::Object(signed_part(&object)), json!({ "a": 1 }));
    }
}
