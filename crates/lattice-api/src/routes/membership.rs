//! Membership beyond join and leave: knocking, forgetting rooms, and room upgrades.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use lattice_service::ServiceError;
use lattice_service::rooms::UpgradeRoom;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, JsonBody, PathParams, parse_room};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/knock/{room_id_or_alias}", post(knock))
        .route("/_matrix/client/v3/rooms/{room_id}/forget", post(forget))
        .route("/_matrix/client/v3/rooms/{room_id}/upgrade", post(upgrade))
}

/// A room ID; aliases are refused with a clear 404 until alias resolution exists.
fn room_id_not_alias(room_id_or_alias: &str) -> ApiResult<OwnedRoomId> {
    if room_id_or_alias.starts_with('#') {
        return Err(ServiceError::NotFound(format!(
            "room aliases cannot be resolved yet; knock with the room ID instead of {room_id_or_alias}"
        ))
        .into());
    }
    parse_room(room_id_or_alias)
}

#[derive(Deserialize)]
struct KnockBody {
    reason: Option<String>,
}

async fn knock(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id_or_alias): PathParams<String>,
    JsonBody(body): JsonBody<KnockBody>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id_not_alias(&room_id_or_alias)?;
    state.service.knock(&session.user_id, &room_id, body.reason).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn forget(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.forget_room(&session.user_id, &room_id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct UpgradeBody {
    new_version: String,
    #[serde(default)]
    additional_creators: Vec<OwnedUserId>,
}

async fn upgrade(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<UpgradeBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let request = UpgradeRoom { new_version: body.new_version, additional_creators: body.additional_creators };
    let replacement = state.service.upgrade_room(&session.user_id, &room_id, request).await?;
    Ok(Json(json!({ "replacement_room": replacement })))
}
