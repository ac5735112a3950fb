//! End-to-end encryption keys: `/keys/upload`, `/keys/query`, `/keys/claim`, `/keys/changes`,
//! `/keys/device_signing/upload`, `/keys/signatures/upload`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::e2ee::{CrossSigningUpload, UploadKeys};
use ruma::OneTimeKeyAlgorithm;
use ruma::api::client::keys::{
    claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys,
};
use ruma::serde::Raw;
use ruma::{OwnedDeviceId, OwnedOneTimeKeyId, OwnedUserId, UInt};
use serde_json::{Map, Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse, raw};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/keys/upload", post(upload))
        .route("/_matrix/client/v3/keys/query", post(query))
        .route("/_matrix/client/v3/keys/claim", post(claim))
        .route("/_matrix/client/v3/keys/changes", get(changes))
        .route("/_matrix/client/v3/keys/device_signing/upload", post(upload_signing))
        .route("/_matrix/client/v3/keys/signatures/upload", post(upload_signatures))
}

/// A raw JSON object from a request, as the service takes it.
fn object<T>(raw: &Raw<T>, what: &str) -> ApiResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(raw.json().get()) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(ApiError::BadJson(format!("{what} must be a JSON object"))),
    }
}

fn value<T>(raw: &Raw<T>) -> ApiResult<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| ApiError::BadJson(e.to_string()))
}

async fn upload(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<upload_keys::v3::Request>,
) -> ApiResult<RumaResponse<upload_keys::v3::Response>> {
    let mut upload = UploadKeys {
        device_keys: request.device_keys.as_ref().map(|keys| object(keys, "device_keys")).transpose()?,
        ..Default::default()
    };
    for (key_id, key) in &request.one_time_keys {
        upload.one_time_keys.insert(key_id.to_string(), value(key)?);
    }
    for (key_id, key) in &request.fallback_keys {
        upload.fallback_keys.insert(key_id.to_string(), value(key)?);
    }
    let counts = state.service.upload_keys(&session.user_id, session.device_id.as_str(), &upload).await?;
    let counts = counts
        .into_iter()
        .map(|(algorithm, count)| (OneTimeKeyAlgorithm::from(algorithm), UInt::new_saturating(count)))
        .collect();
    Ok(RumaResponse(upload_keys::v3::Response::new(counts)))
}

async fn query(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_keys::v3::Request>,
) -> ApiResult<RumaResponse<get_keys::v3::Response>> {
    let targets: BTreeMap<OwnedUserId, Vec<String>> = request
        .device_keys
        .into_iter()
        .map(|(user, devices)| (user, devices.into_iter().map(|d| d.to_string()).collect()))
        .collect();
    let (found, failures) = state.service.query_keys(&session.user_id, &targets, request.timeout).await?;
    let mut response = get_keys::v3::Response::new();
    response.failures = failures;
    for (user, devices) in found.device_keys {
        let mut keys = BTreeMap::new();
        for (device, object) in devices {
            keys.insert(OwnedDeviceId::from(device), raw(&object)?);
        }
        response.device_keys.insert(user, keys);
    }
    for (user, key) in found.master_keys {
        response.master_keys.insert(user, raw(&key)?);
    }
    for (user, key) in found.self_signing_keys {
        response.self_signing_keys.insert(user, raw(&key)?);
    }
    for (user, key) in found.user_signing_keys {
        response.user_signing_keys.insert(user, raw(&key)?);
    }
    Ok(RumaResponse(response))
}

async fn claim(
    State(state): State<AppState>,
    Auth(_session): Auth,
    Ruma(request): Ruma<claim_keys::v3::Request>,
) -> ApiResult<RumaResponse<claim_keys::v3::Response>> {
    let targets: BTreeMap<OwnedUserId, BTreeMap<String, String>> = request
        .one_time_keys
        .into_iter()
        .map(|(user, devices)| {
            (user, devices.into_iter().map(|(device, algorithm)| (device.to_string(), algorithm.to_string())).collect())
        })
        .collect();
    let (claimed, failures) = state.service.claim_keys(&targets, request.timeout).await?;
    let mut one_time_keys = BTreeMap::new();
    for (user, devices) in claimed {
        let mut by_device = BTreeMap::new();
        for (device, keys) in devices {
            let mut by_id = BTreeMap::new();
            for (key_id, key) in keys {
                // Another server's answer may hold a key ID this one cannot read: left out.
                let Ok(key_id) = OwnedOneTimeKeyId::try_from(key_id.as_str()) else { continue };
                by_id.insert(key_id, raw(&key)?);
            }
            by_device.insert(OwnedDeviceId::from(device), by_id);
        }
        one_time_keys.insert(user, by_device);
    }
    let mut response = claim_keys::v3::Response::new(one_time_keys);
    response.failures = failures;
    Ok(RumaResponse(response))
}

async fn changes(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_key_changes::v3::Request>,
) -> ApiResult<RumaResponse<get_key_changes::v3::Response>> {
    let (changed, left) = state.service.key_changes(&session.user_id, &request.from, &request.to).await?;
    Ok(RumaResponse(get_key_changes::v3::Response::new(changed, left)))
}

async fn upload_signing(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<upload_signing_keys::v3::Request>,
) -> ApiResult<RumaResponse<upload_signing_keys::v3::Response>> {
    let upload = CrossSigningUpload {
        master_key: request.master_key.as_ref().map(|key| object(key, "master_key")).transpose()?,
        self_signing_key: request.self_signing_key.as_ref().map(|key| object(key, "self_signing_key")).transpose()?,
        user_signing_key: request.user_signing_key.as_ref().map(|key| object(key, "user_signing_key")).transpose()?,
    };
    state.service.upload_signing_keys(&session.user_id, &upload, request.auth.as_ref()).await?;
    Ok(RumaResponse(upload_signing_keys::v3::Response::new()))
}

async fn upload_signatures(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<upload_signatures::v3::Request>,
) -> ApiResult<Json<Value>> {
    let mut signed_keys: BTreeMap<OwnedUserId, BTreeMap<String, Map<String, Value>>> = BTreeMap::new();
    for (user, keys) in &request.signed_keys {
        for (key_id, object) in keys.iter() {
            let Ok(Value::Object(object)) = serde_json::from_str::<Value>(object.get()) else {
                return Err(ApiError::BadJson(format!("the signed key {key_id} of {user} must be an object")));
            };
            signed_keys.entry(user.clone()).or_default().insert(key_id.to_owned(), object);
        }
    }
    let failures = state.service.upload_signatures(&session.user_id, &signed_keys).await?;
    let failures: BTreeMap<String, BTreeMap<String, Value>> = failures
        .into_iter()
        .map(|(user, keys)| {
            let keys = keys
                .into_iter()
                .map(|(key, failure)| (key, json!({ "errcode": failure.errcode, "error": failure.error })))
                .collect();
            (user.to_string(), keys)
        })
        .collect();
    Ok(Json(json!({ "failures": failures })))
}
