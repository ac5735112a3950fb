//! Checking and signing PDUs: the format and signature steps of the one ingest path
//! (architecture invariant 1), on top of ruma's canonical JSON, hashing and signing.
//!
//! The order is the spec's ("Checks performed on receipt of a PDU"): size and format, then
//! signatures, then the content hash, whose mismatch keeps only the redacted event.

use ruma::canonical_json::redact;
use ruma::room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion};
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap, Verified, hash_and_sign_event, reference_hash, verify_event};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId};

use crate::limits::MAX_PDU_BYTES;
use crate::room_version::RoomVersion;

/// Why a PDU was refused; each names the rule that failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("PDU is {size} bytes, over the limit of {MAX_PDU_BYTES}")]
    TooLarge { size: usize },
    #[error("PDU is not canonical JSON: {0}")]
    NotCanonicalJson(String),
    #[error("PDU is not a JSON object")]
    NotAnObject,
    #[error("PDU format: {0}")]
    Format(String),
    #[error("event ID: {0}")]
    EventId(String),
    #[error("signature check failed: {0}")]
    Signature(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// The result of checking hashes and signatures.
#[derive(Clone, Debug, PartialEq)]
pub enum Checked {
    /// Signatures and content hash are valid: keep the event as it is.
    Intact(CanonicalJsonObject),
    /// Signatures are valid but the content hash is not: the spec keeps only the redacted form.
    Redacted(CanonicalJsonObject),
}

/// Parses raw bytes into a PDU object: size limit first (before any parsing work), then
/// canonical JSON (no floats, integers within ±(2^53−1), valid UTF-8), then the room version's
/// event format (required fields, their types and lengths, `prev_events`/`auth_events` counts,
/// depth range).
pub fn parse(bytes: &[u8], version: &RoomVersion) -> Result<CanonicalJsonObject, PduError> {
    if bytes.len() > MAX_PDU_BYTES {
        return Err(PduError::TooLarge { size: bytes.len() });
    }
    let value: CanonicalJsonValue =
        serde_json::from_slice(bytes).map_err(|e| PduError::NotCanonicalJson(e.to_string()))?;
    let CanonicalJsonValue::Object(object) = value else {
        return Err(PduError::NotAnObject);
    };
    check_format(&object, version)?;
    Ok(object)
}

/// The event-format checks alone, for objects already in memory (e.g. locally built events).
pub fn check_format(object: &CanonicalJsonObject, version: &RoomVersion) -> Result<(), PduError> {
    ruma::state_res::check_pdu_format(object, &version.rules().event_format).map_err(PduError::Format)?;
    // ruma counts `prev_events` and `auth_events` but does not look inside them.
    for field in ["prev_events", "auth_events"] {
        if let Some(CanonicalJsonValue::Array(references)) = object.get(field) {
            for reference in references {
                check_reference(reference, version.rules().events_reference_format)
                    .map_err(|why| PduError::Format(format!("{field}: {why}")))?;
            }
        }
    }
    Ok(())
}

/// One entry of `prev_events`/`auth_events`: `"$id"` from v3, `["$id:server", {hashes}]` before.
fn check_reference(reference: &CanonicalJsonValue, format: EventsReferenceFormatVersion) -> Result<(), String> {
    let id = match (format, reference) {
        (EventsReferenceFormatVersion::V1, CanonicalJsonValue::Array(pair)) => match pair.as_slice() {
            [CanonicalJsonValue::String(id), CanonicalJsonValue::Object(_)] => id,
            _ => return Err("each entry must be [event_id, hashes]".into()),
        },
        (EventsReferenceFormatVersion::V1, _) => return Err("each entry must be [event_id, hashes]".into()),
        (_, CanonicalJsonValue::String(id)) => id,
        _ => return Err("each entry must be an event ID string".into()),
    };
    EventId::parse(id.as_str()).map(|_| ()).map_err(|e| format!("invalid event ID {id:?}: {e}"))
}

/// The event's ID: carried in the event for versions 1–2, the reference hash from version 3 on
/// (standard base64 in v3, URL-safe base64 from v4).
pub fn event_id(object: &CanonicalJsonObject, version: &RoomVersion) -> Result<OwnedEventId, PduError> {
    match version.rules().event_id_format {
        EventIdFormatVersion::V1 => match object.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => {
                EventId::parse(id.as_str()).map_err(|e| PduError::EventId(e.to_string()))
            }
            _ => Err(PduError::EventId("missing event_id".into())),
        },
        _ => {
            let hash = reference_hash(object, version.rules()).map_err(|e| PduError::EventId(e.to_string()))?;
            EventId::parse(format!("${hash}")).map_err(|e| PduError::EventId(e.to_string()))
        }
    }
}

/// Verifies the signatures the spec requires (the sender's server, and for v1–2 the event ID's
/// server) against `keys`, then the content hash. A bad or missing signature rejects the
/// event; a wrong content hash keeps only its redacted form.
pub fn check_signatures_and_hashes(
    object: CanonicalJsonObject,
    version: &RoomVersion,
    keys: &PublicKeyMap,
) -> Result<Checked, PduError> {
    match verify_event(keys, &object, version.rules()) {
        Ok(Verified::All) => Ok(Checked::Intact(object)),
        Ok(Verified::Signatures) => Ok(Checked::Redacted(redacted(object, version)?)),
        Err(e) => Err(PduError::Signature(e.to_string())),
    }
}

/// The event as the room version's redaction algorithm leaves it.
pub fn redacted(object: CanonicalJsonObject, version: &RoomVersion) -> Result<CanonicalJsonObject, PduError> {
    redact(object, &version.rules().redaction, None).map_err(|e| PduError::Format(e.to_string()))
}

/// Adds the content hash and this server's signature to a locally built event.
pub fn hash_and_sign(
    object: &mut CanonicalJsonObject,
    server_name: &str,
    key: &Ed25519KeyPair,
    version: &RoomVersion,
) -> Result<(), PduError> {
    hash_and_sign_event(server_name, key, object, &version.rules().redaction)
        .map_err(|e| PduError::Signing(e.to_string()))
}

#[cfg(test)]
mod tests;
