//! Global account data and filters under `/user/{userId}`.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::JsonObject;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, JsonBody, PathParams, parse_room, parse_user};

pub fn routes() -> Routes {
    Routes::new()
        .route(
            "/_matrix/client/v3/user/{user_id}/account_data/{event_type}",
            get(get_account_data).put(set_account_data),
        )
        .route(
            "/_matrix/client/v3/user/{user_id}/rooms/{room_id}/account_data/{event_type}",
            get(get_room_account_data).put(set_room_account_data),
        )
        .route("/_matrix/client/v3/user/{user_id}/filter", post(create_filter))
        .route("/_matrix/client/v3/user/{user_id}/filter/{filter_id}", get(get_filter))
}

async fn get_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, event_type)): PathParams<(String, String)>,
) -> ApiResult<Json<JsonObject>> {
    Ok(Json(state.service.account_data().get(&session.user_id, &parse_user(&user_id)?, None, &event_type).await?))
}

async fn set_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, event_type)): PathParams<(String, String)>,
    JsonBody(content): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    state.service.set_account_data(&session.user_id, &parse_user(&user_id)?, None, &event_type, content).await?;
    Ok(Json(json!({})))
}

async fn create_filter(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(user_id): PathParams<String>,
    JsonBody(filter): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    let id = state.service.account_data().create_filter(&session.user_id, &parse_user(&user_id)?, filter).await?;
    Ok(Json(json!({ "filter_id": id.to_string() })))
}

async fn get_filter(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, filter_id)): PathParams<(String, String)>,
) -> ApiResult<Json<JsonObject>> {
    Ok(Json(state.service.account_data().filter(&session.user_id, &parse_user(&user_id)?, &filter_id).await?))
}

async fn get_room_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, room_id, event_type)): PathParams<(String, String, String)>,
) -> ApiResult<Json<JsonObject>> {
    let (user, room) = (parse_user(&user_id)?, parse_room(&room_id)?);
    Ok(Json(state.service.account_data().get(&session.user_id, &user, Some(&room), &event_type).await?))
}

async fn set_room_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, room_id, event_type)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    let (user, room) = (parse_user(&user_id)?, parse_room(&room_id)?);
    state.service.set_account_data(&session.user_id, &user, Some(&room), &event_type, content).await?;
    Ok(Json(json!({})))
}
