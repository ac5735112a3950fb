//! `/profile/{userId}` and its `displayname` and `avatar_url` fields.

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use lattice_service::{ProfileField, ServiceError};
use ruma::api::client::profile::{delete_profile_field, get_profile};
use serde_json::{Map, Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, PathParams, parse_user};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/profile/{user_id}", get(get_profile))
        .route("/_matrix/client/v3/profile/{user_id}/{field}", get(get_field).put(set_field).delete(delete_field))
}

fn parse_field(field: &str) -> Option<ProfileField> {
    match field {
        "displayname" => Some(ProfileField::DisplayName),
        "avatar_url" => Some(ProfileField::AvatarUrl),
        _ => None,
    }
}

fn custom_field_refused(field: &str) -> ApiError {
    ServiceError::Forbidden(format!("profile field {field:?} is not supported; see the m.profile_fields capability"))
        .into()
}

async fn get_profile(
    State(state): State<AppState>,
    Ruma(request): Ruma<get_profile::v3::Request>,
) -> ApiResult<RumaResponse<get_profile::v3::Response>> {
    let profile = state.service.accounts().profile(&request.user_id).await?;
    let mut response = get_profile::v3::Response::new();
    if let Some(name) = profile.displayname {
        response.set("displayname".into(), json!(name));
    }
    if let Some(url) = profile.avatar_url {
        response.set("avatar_url".into(), json!(url));
    }
    Ok(RumaResponse(response))
}

async fn get_field(
    State(state): State<AppState>,
    PathParams((user_id, field)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let profile = state.service.accounts().profile(&parse_user(&user_id)?).await?;
    let value = match parse_field(&field) {
        Some(ProfileField::DisplayName) => profile.displayname,
        Some(ProfileField::AvatarUrl) => profile.avatar_url,
        None => None,
    };
    match value {
        Some(value) => Ok(Json(Value::Object(Map::from_iter([(field, json!(value))])))),
        None => Err(ServiceError::NotFound(format!("{user_id} has no {field}")).into()),
    }
}

async fn set_field(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((user_id, field)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let target = parse_user(&user_id)?;
    let Some(kind) = parse_field(&field) else { return Err(custom_field_refused(&field)) };
    let value = match body.get(&field) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) => None,
        Some(_) => return Err(ApiError::BadJson(format!("{field} must be a string"))),
        None => return Err(ApiError::BadJson(format!("body must contain {field}"))),
    };
    state.service.set_profile_field(&session.user_id, &target, kind, value).await?;
    Ok(Json(json!({})))
}

async fn delete_field(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_profile_field::v3::Request>,
) -> ApiResult<RumaResponse<delete_profile_field::v3::Response>> {
    let field = request.field.as_str();
    let Some(kind) = parse_field(field) else { return Err(custom_field_refused(field)) };
    state.service.set_profile_field(&session.user_id, &request.user_id, kind, None).await?;
    Ok(RumaResponse(delete_profile_field::v3::Response::new()))
}
