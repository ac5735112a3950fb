//! Membership beyond join and leave: knocking, forgetting rooms, and room upgrades.

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use lattice_service::rooms::UpgradeRoom;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, JsonBody, PathParams, parse_room};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/knock/{room_id_or_alias}", post(knock))
        .route("/_matrix/client/v3/rooms/{room_id}/forget", post(forget))
        .route("/_matrix/client/v3/rooms/{room_id}/upgrade", post(upgrade))
}

/// A room ID, or the room a local alias points to.
async fn resolve_room(state: &AppState, target: &str) -> ApiResult<OwnedRoomId> {
    if target.starts_with('#') {
        return Ok(state.service.rooms().resolve_alias(&crate::extract::parse_alias(target)?).await?);
    }
    parse_room(target)
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
    state.limits.join_per_user.check(session.user_id.as_str())?;
    let room_id = resolve_room(&state, &room_id_or_alias).await?;
    state.service.rooms().knock(&session.user_id, &room_id, body.reason).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn forget(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.rooms().forget_room(&session.user_id, &room_id).await?;
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
    state.limits.room_creation_per_user.check(session.user_id.as_str())?;
    let room_id = parse_room(&room_id)?;
    let request = UpgradeRoom { new_version: body.new_version, additional_creators: body.additional_creators };
    let replacement = state.service.rooms().upgrade_room(&session.user_id, &room_id, request).await?;
    Ok(Json(json!({ "replacement_room": replacement })))
}
