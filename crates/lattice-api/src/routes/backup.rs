//! Server-side key backup: `/room_keys/version[/{version}]` and
//! `/room_keys/keys[/{roomId}[/{sessionId}]]`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::e2ee::{BackupInfo, BackupKeys, BackupWrite};
use ruma::api::client::backup::{
    RoomKeyBackup, add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session, create_backup_version,
    delete_backup_keys, delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version,
    get_backup_info, get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session, get_latest_backup_info,
    update_backup_version,
};
use ruma::serde::Raw;
use ruma::{OwnedRoomId, UInt};
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse, raw};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/room_keys/version", post(create_version).get(latest_version))
        .route(
            "/_matrix/client/v3/room_keys/version/{version}",
            get(get_version).put(update_version).delete(delete_version),
        )
        .route("/_matrix/client/v3/room_keys/keys", get(get_all).put(put_all).delete(delete_all))
        .route("/_matrix/client/v3/room_keys/keys/{room_id}", get(get_room).put(put_room).delete(delete_room))
        .route(
            "/_matrix/client/v3/room_keys/keys/{room_id}/{session_id}",
            get(get_session).put(put_session).delete(delete_session),
        )
}

/// `{algorithm, auth_data}` (and, on update, `version`) of a request body.
fn algorithm_body<T>(body: &Raw<T>) -> ApiResult<(String, Value, Option<String>)> {
    let value: Value = serde_json::from_str(body.json().get()).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let algorithm = value["algorithm"].as_str().ok_or_else(|| ApiError::BadJson("algorithm is required".into()))?;
    let version = match &value["version"] {
        Value::Null => None,
        Value::String(version) => Some(version.clone()),
        _ => return Err(ApiError::BadJson("version must be a string".into())),
    };
    Ok((algorithm.to_owned(), value["auth_data"].clone(), version))
}

fn session_value<T>(data: &Raw<T>) -> ApiResult<Value> {
    serde_json::from_str(data.json().get()).map_err(|e| ApiError::BadJson(e.to_string()))
}

fn written(write: BackupWrite) -> (String, UInt) {
    (write.etag, UInt::new_saturating(write.count))
}

fn sessions(
    keys: BTreeMap<String, Value>,
) -> ApiResult<BTreeMap<String, Raw<ruma::api::client::backup::KeyBackupData>>> {
    keys.into_iter().map(|(session, data)| Ok((session, raw(&data)?))).collect()
}

async fn create_version(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<create_backup_version::v3::Request>,
) -> ApiResult<RumaResponse<create_backup_version::v3::Response>> {
    let (algorithm, auth_data, _) = algorithm_body(&request.algorithm)?;
    let version = state.service.e2ee().create_backup(&session.user_id, &algorithm, auth_data).await?;
    Ok(RumaResponse(create_backup_version::v3::Response::new(version)))
}

fn info_parts(info: BackupInfo) -> ApiResult<(Raw<ruma::api::client::backup::BackupAlgorithm>, UInt, String, String)> {
    let algorithm = raw(&json!({ "algorithm": info.algorithm, "auth_data": info.auth_data }))?;
    Ok((algorithm, UInt::new_saturating(info.count), info.etag, info.version))
}

async fn latest_version(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_latest_backup_info::v3::Request>,
) -> ApiResult<RumaResponse<get_latest_backup_info::v3::Response>> {
    let info = state.service.e2ee().backup_info(&session.user_id, None).await?;
    let (algorithm, count, etag, version) = info_parts(info)?;
    Ok(RumaResponse(get_latest_backup_info::v3::Response::new(algorithm, count, etag, version)))
}

async fn get_version(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_backup_info::v3::Request>,
) -> ApiResult<RumaResponse<get_backup_info::v3::Response>> {
    let info = state.service.e2ee().backup_info(&session.user_id, Some(&request.version)).await?;
    let (algorithm, count, etag, version) = info_parts(info)?;
    Ok(RumaResponse(get_backup_info::v3::Response::new(algorithm, count, etag, version)))
}

async fn update_version(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<update_backup_version::v3::Request>,
) -> ApiResult<RumaResponse<update_backup_version::v3::Response>> {
    let (algorithm, auth_data, body_version) = algorithm_body(&request.algorithm)?;
    state
        .service
        .e2ee()
        .update_backup(&session.user_id, &request.version, body_version.as_deref(), &algorithm, auth_data)
        .await?;
    Ok(RumaResponse(update_backup_version::v3::Response::new()))
}

async fn delete_version(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_backup_version::v3::Request>,
) -> ApiResult<RumaResponse<delete_backup_version::v3::Response>> {
    state.service.e2ee().delete_backup(&session.user_id, &request.version).await?;
    Ok(RumaResponse(delete_backup_version::v3::Response::new()))
}

async fn put_all(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<add_backup_keys::v3::Request>,
) -> ApiResult<RumaResponse<add_backup_keys::v3::Response>> {
    let mut keys = BackupKeys::new();
    for (room, backup) in &request.rooms {
        let room_keys = keys.entry(room.to_string()).or_default();
        for (session_id, data) in &backup.sessions {
            room_keys.insert(session_id.clone(), session_value(data)?);
        }
    }
    let write = state.service.e2ee().put_backup_keys(&session.user_id, &request.version, &keys).await?;
    let (etag, count) = written(write);
    Ok(RumaResponse(add_backup_keys::v3::Response::new(etag, count)))
}

async fn put_room(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<add_backup_keys_for_room::v3::Request>,
) -> ApiResult<RumaResponse<add_backup_keys_for_room::v3::Response>> {
    let mut room_keys = BTreeMap::new();
    for (session_id, data) in &request.sessions {
        room_keys.insert(session_id.clone(), session_value(data)?);
    }
    let keys = BackupKeys::from([(request.room_id.to_string(), room_keys)]);
    let write = state.service.e2ee().put_backup_keys(&session.user_id, &request.version, &keys).await?;
    let (etag, count) = written(write);
    Ok(RumaResponse(add_backup_keys_for_room::v3::Response::new(etag, count)))
}

async fn put_session(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<add_backup_keys_for_session::v3::Request>,
) -> ApiResult<RumaResponse<add_backup_keys_for_session::v3::Response>> {
    let data = session_value(&request.session_data)?;
    let keys = BackupKeys::from([(request.room_id.to_string(), BTreeMap::from([(request.session_id.clone(), data)]))]);
    let write = state.service.e2ee().put_backup_keys(&session.user_id, &request.version, &keys).await?;
    let (etag, count) = written(write);
    Ok(RumaResponse(add_backup_keys_for_session::v3::Response::new(etag, count)))
}

async fn get_all(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_backup_keys::v3::Request>,
) -> ApiResult<RumaResponse<get_backup_keys::v3::Response>> {
    let keys = state.service.e2ee().backup_keys(&session.user_id, &request.version, None, None).await?;
    let mut rooms = BTreeMap::new();
    for (room, room_keys) in keys {
        let Ok(room) = OwnedRoomId::try_from(room) else { continue };
        rooms.insert(room, RoomKeyBackup::new(sessions(room_keys)?));
    }
    Ok(RumaResponse(get_backup_keys::v3::Response::new(rooms)))
}

async fn get_room(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_backup_keys_for_room::v3::Request>,
) -> ApiResult<RumaResponse<get_backup_keys_for_room::v3::Response>> {
    let room = request.room_id.to_string();
    let mut keys = state.service.e2ee().backup_keys(&session.user_id, &request.version, Some(&room), None).await?;
    let room_keys = keys.remove(&room).unwrap_or_default();
    Ok(RumaResponse(get_backup_keys_for_room::v3::Response::new(sessions(room_keys)?)))
}

async fn get_session(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_backup_keys_for_session::v3::Request>,
) -> ApiResult<RumaResponse<get_backup_keys_for_session::v3::Response>> {
    let room = request.room_id.to_string();
    let keys = state
        .service
        .e2ee()
        .backup_keys(&session.user_id, &request.version, Some(&room), Some(&request.session_id))
        .await?;
    let data = keys
        .get(&room)
        .and_then(|sessions| sessions.get(&request.session_id))
        .ok_or_else(|| ApiError::Service(lattice_service::ServiceError::NotFound("no such session".into())))?;
    Ok(RumaResponse(get_backup_keys_for_session::v3::Response::new(raw(data)?)))
}

async fn delete_all(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_backup_keys::v3::Request>,
) -> ApiResult<RumaResponse<delete_backup_keys::v3::Response>> {
    let write = state.service.e2ee().delete_backup_keys(&session.user_id, &request.version, None, None).await?;
    let (etag, count) = written(write);
    Ok(RumaResponse(delete_backup_keys::v3::Response::new(etag, count)))
}

async fn delete_room(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_backup_keys_for_room::v3::Request>,
) -> ApiResult<RumaResponse<delete_backup_keys_for_room::v3::Response>> {
    let room = request.room_id.to_string();
    let write = state.service.e2ee().delete_backup_keys(&session.user_id, &request.version, Some(&room), None).await?;
    let (etag, count) = written(write);
    Ok(RumaResponse(delete_backup_keys_for_room::v3::Response::new(etag, count)))
}

async fn delete_session(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_backup_keys_for_session::v3::Request>,
) -> ApiResult<RumaResponse<delete_backup_keys_for_session::v3::Response>> {
    let room = request.room_id.to_string();
    let write = state
        .service
        .e2ee()
        .delete_backup_keys(&session.user_id, &request.version, Some(&room), Some(&request.session_id))
        .await?;
    let (etag, count) = written(write);
    Ok(RumaResponse(delete_backup_keys_for_session::v3::Response::new(etag, count)))
}
