//! Room tags under `/user/{userId}/rooms/{roomId}/tags`, stored as `m.tag` room account data.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, put};
use lattice_service::JsonObject;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, JsonBody, PathParams, parse_room, parse_user};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/user/{user_id}/rooms/{room_id}/tags", get(tags))
        .route("/_matrix/client/v3/user/{user_id}/rooms/{room_id}/tags/{tag}", put(set_tag).delete(delete_tag))
}

async fn tags(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, room_id)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (user, room) = (parse_user(&user_id)?, parse_room(&room_id)?);
    Ok(Json(json!({ "tags": state.service.account_data().room_tags(&session.user_id, &user, &room).await? })))
}

async fn set_tag(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, room_id, tag)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    let (user, room) = (parse_user(&user_id)?, parse_room(&room_id)?);
    state.service.set_room_tag(&session.user_id, &user, &room, &tag, content).await?;
    Ok(Json(json!({})))
}

async fn delete_tag(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, room_id, tag)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (user, room) = (parse_user(&user_id)?, parse_room(&room_id)?);
    state.service.account_data().delete_room_tag(&session.user_id, &user, &room, &tag).await?;
    Ok(Json(json!({})))
}
