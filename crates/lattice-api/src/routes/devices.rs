//! `/devices` and `/delete_devices`.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::DeviceInfo;
use ruma::api::client::uiaa::AuthData;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, ClientIp, JsonBody, PathParams};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/devices", get(list_devices))
        .route("/_matrix/client/v3/devices/{device_id}", get(get_device).put(rename_device).delete(delete_device))
        .route("/_matrix/client/v3/delete_devices", post(delete_devices))
}

fn device_json(device: DeviceInfo) -> Value {
    let mut value = json!({ "device_id": device.device_id });
    if let Some(name) = device.display_name {
        value["display_name"] = json!(name);
    }
    if let Some(ip) = device.last_seen_ip {
        value["last_seen_ip"] = json!(ip);
    }
    if let Some(ts) = device.last_seen_ts {
        value["last_seen_ts"] = json!(ts);
    }
    value
}

async fn list_devices(State(state): State<AppState>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    let devices = state.service.accounts().devices(&session.user_id).await?;
    Ok(Json(json!({ "devices": devices.into_iter().map(device_json).collect::<Vec<_>>() })))
}

async fn get_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(device_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(device_json(state.service.accounts().device(&session.user_id, &device_id).await?)))
}

#[derive(Deserialize)]
struct RenameBody {
    display_name: Option<String>,
}

async fn rename_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(device_id): PathParams<String>,
    JsonBody(body): JsonBody<RenameBody>,
) -> ApiResult<Json<Value>> {
    state.service.accounts().rename_device(&session.user_id, &device_id, body.display_name).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteDeviceBody {
    auth: Option<AuthData>,
}

async fn delete_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    PathParams(device_id): PathParams<String>,
    JsonBody(body): JsonBody<DeleteDeviceBody>,
) -> ApiResult<Json<Value>> {
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, body.auth.as_ref())?;
    state.service.accounts().device(&session.user_id, &device_id).await?;
    state.service.delete_devices_with_auth(&session.user_id, &[device_id], body.auth.as_ref()).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteDevicesBody {
    devices: Vec<String>,
    auth: Option<AuthData>,
}

async fn delete_devices(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    JsonBody(body): JsonBody<DeleteDevicesBody>,
) -> ApiResult<Json<Value>> {
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, body.auth.as_ref())?;
    state.service.delete_devices_with_auth(&session.user_id, &body.devices, body.auth.as_ref()).await?;
    Ok(Json(json!({})))
}
