//! `/devices` and `/delete_devices`.

use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::DeviceInfo;
use ruma::api::client::device::{Device, delete_device, delete_devices, get_device, get_devices, update_device};
use ruma::{MilliSecondsSinceUnixEpoch, UInt};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, ClientIp};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/devices", get(list_devices))
        .route("/_matrix/client/v3/devices/{device_id}", get(get_device).put(rename_device).delete(delete_device))
        .route("/_matrix/client/v3/delete_devices", post(delete_devices))
}

fn device(info: DeviceInfo) -> Device {
    let mut device = Device::new(info.device_id.into());
    device.display_name = info.display_name;
    device.last_seen_ip = info.last_seen_ip;
    device.last_seen_ts = info.last_seen_ts.and_then(UInt::new).map(MilliSecondsSinceUnixEpoch);
    device
}

async fn list_devices(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_devices::v3::Request>,
) -> ApiResult<RumaResponse<get_devices::v3::Response>> {
    let devices = state.service.accounts().devices(&session.user_id).await?;
    Ok(RumaResponse(get_devices::v3::Response::new(devices.into_iter().map(device).collect())))
}

async fn get_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_device::v3::Request>,
) -> ApiResult<RumaResponse<get_device::v3::Response>> {
    let info = state.service.accounts().device(&session.user_id, request.device_id.as_str()).await?;
    Ok(RumaResponse(get_device::v3::Response::new(device(info))))
}

async fn rename_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<update_device::v3::Request>,
) -> ApiResult<RumaResponse<update_device::v3::Response>> {
    let accounts = state.service.accounts();
    accounts.rename_device(&session.user_id, request.device_id.as_str(), request.display_name).await?;
    Ok(RumaResponse(update_device::v3::Response::new()))
}

async fn delete_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    Ruma(request): Ruma<delete_device::v3::Request>,
) -> ApiResult<RumaResponse<delete_device::v3::Response>> {
    let auth = request.auth.as_ref();
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, auth)?;
    let device_id = request.device_id.to_string();
    state.service.accounts().device(&session.user_id, &device_id).await?;
    state.service.delete_devices_with_auth(&session.user_id, &[device_id], auth).await?;
    Ok(RumaResponse(delete_device::v3::Response::new()))
}

async fn delete_devices(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    Ruma(request): Ruma<delete_devices::v3::Request>,
) -> ApiResult<RumaResponse<delete_devices::v3::Response>> {
    let auth = request.auth.as_ref();
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, auth)?;
    let devices: Vec<String> = request.devices.iter().map(ToString::to_string).collect();
    state.service.delete_devices_with_auth(&session.user_id, &devices, auth).await?;
    Ok(RumaResponse(delete_devices::v3::Response::new()))
}
