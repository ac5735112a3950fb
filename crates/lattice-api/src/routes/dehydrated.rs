//! Dehydrated devices (MSC3814, unstable `org.matrix.msc3814.v1`): `PUT`, `GET` and `DELETE
//! /dehydrated_device`, and `POST /dehydrated_device/{deviceId}/events`. On ruma's types for
//! the MSC (its `unstable-msc3814` feature); `device_data` stays opaque JSON, stored and
//! returned verbatim, so the server never depends on the client's pickle format.

use axum::extract::State;
use axum::routing::{post, put};
use lattice_service::NewDehydratedDevice;
use lattice_service::e2ee::UploadKeys;
use ruma::OwnedDeviceId;
use ruma::api::client::dehydrated_device::{
    delete_dehydrated_device, get_dehydrated_device, get_events, put_dehydrated_device,
};
use ruma::serde::Raw;
use serde_json::{Map, Value};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse, raw};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", put(store).get(fetch).delete(delete))
        .route("/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{device_id}/events", post(events))
}

fn json<T>(raw: &Raw<T>, what: &str) -> ApiResult<Value> {
    serde_json::from_str(raw.json().get()).map_err(|e| ApiError::BadJson(format!("{what}: {e}")))
}

fn object<T>(raw: &Raw<T>, what: &str) -> ApiResult<Map<String, Value>> {
    match json(raw, what)? {
        Value::Object(object) => Ok(object),
        _ => Err(ApiError::BadJson(format!("{what} must be a JSON object"))),
    }
}

async fn store(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<put_dehydrated_device::unstable::Request>,
) -> ApiResult<RumaResponse<put_dehydrated_device::unstable::Response>> {
    let mut keys = UploadKeys { device_keys: Some(object(&request.device_keys, "device_keys")?), ..Default::default() };
    for (key_id, key) in &request.one_time_keys {
        keys.one_time_keys.insert(key_id.to_string(), json(key, "one-time key")?);
    }
    for (key_id, key) in &request.fallback_keys {
        keys.fallback_keys.insert(key_id.to_string(), json(key, "fallback key")?);
    }
    let new = NewDehydratedDevice {
        device_id: request.device_id.to_string(),
        display_name: request.initial_device_display_name,
        device_data: json(&request.device_data, "device_data")?,
        keys,
    };
    state.service.put_dehydrated_device(&session.user_id, new).await?;
    Ok(RumaResponse(put_dehydrated_device::unstable::Response::new(request.device_id)))
}

async fn fetch(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_dehydrated_device::unstable::Request>,
) -> ApiResult<RumaResponse<get_dehydrated_device::unstable::Response>> {
    let device = state.service.dehydrated_device(&session.user_id).await?;
    let device_id = OwnedDeviceId::from(device.device_id);
    Ok(RumaResponse(get_dehydrated_device::unstable::Response::new(device_id, raw(&device.device_data)?)))
}

async fn delete(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<delete_dehydrated_device::unstable::Request>,
) -> ApiResult<RumaResponse<delete_dehydrated_device::unstable::Response>> {
    let device_id = state.service.delete_dehydrated_device(&session.user_id).await?;
    Ok(RumaResponse(delete_dehydrated_device::unstable::Response::new(device_id.into())))
}

async fn events(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_events::unstable::Request>,
) -> ApiResult<RumaResponse<get_events::unstable::Response>> {
    let (events, next_batch) = state
        .service
        .dehydrated_device_events(&session.user_id, request.device_id.as_str(), request.next_batch.as_deref())
        .await?;
    let events = events.iter().map(raw).collect::<ApiResult<Vec<_>>>()?;
    let mut response = get_events::unstable::Response::new(events);
    response.next_batch = Some(next_batch);
    Ok(RumaResponse(response))
}
