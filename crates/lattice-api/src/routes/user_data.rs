//! Global account data and filters under `/user/{userId}`.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::JsonObject;
use ruma::api::client::config::{
    get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
};
use ruma::serde::Raw;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, PathParams, parse_user};
use crate::typed::{Ruma, RumaResponse};

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

/// A request's content: any JSON object (account data types are open-ended).
fn object_content<T>(data: &Raw<T>) -> ApiResult<JsonObject> {
    data.deserialize_as_unchecked().map_err(|e| ApiError::BadJson(format!("content must be a JSON object: {e}")))
}

async fn get_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_global_account_data::v3::Request>,
) -> ApiResult<RumaResponse<get_global_account_data::v3::Response>> {
    let event_type = request.event_type.to_string();
    let content = state.service.account_data().get(&session.user_id, &request.user_id, None, &event_type).await?;
    Ok(RumaResponse(get_global_account_data::v3::Response::new(crate::typed::raw(&content)?)))
}

async fn set_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_global_account_data::v3::Request>,
) -> ApiResult<RumaResponse<set_global_account_data::v3::Response>> {
    let (content, event_type) = (object_content(&request.data)?, request.event_type.to_string());
    state.service.set_account_data(&session.user_id, &request.user_id, None, &event_type, content).await?;
    Ok(RumaResponse(set_global_account_data::v3::Response::new()))
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
    Ruma(request): Ruma<get_room_account_data::v3::Request>,
) -> ApiResult<RumaResponse<get_room_account_data::v3::Response>> {
    let (user, room, event_type) = (&request.user_id, &request.room_id, request.event_type.to_string());
    let content = state.service.account_data().get(&session.user_id, user, Some(room), &event_type).await?;
    Ok(RumaResponse(get_room_account_data::v3::Response::new(crate::typed::raw(&content)?)))
}

async fn set_room_account_data(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_room_account_data::v3::Request>,
) -> ApiResult<RumaResponse<set_room_account_data::v3::Response>> {
    let (content, event_type) = (object_content(&request.data)?, request.event_type.to_string());
    let (user, room) = (&request.user_id, &request.room_id);
    state.service.set_account_data(&session.user_id, user, Some(room), &event_type, content).await?;
    Ok(RumaResponse(set_room_account_data::v3::Response::new()))
}
