//! Room tags under `/user/{userId}/rooms/{roomId}/tags`, stored as `m.tag` room account data.

use axum::extract::State;
use axum::routing::{get, put};
use lattice_service::JsonObject;
use ruma::api::client::tag::{create_tag, delete_tag, get_tags};
use ruma::events::tag::{TagInfo, TagName, Tags};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/user/{user_id}/rooms/{room_id}/tags", get(tags))
        .route("/_matrix/client/v3/user/{user_id}/rooms/{room_id}/tags/{tag}", put(set_tag).delete(delete_tag))
}

async fn tags(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_tags::v3::Request>,
) -> ApiResult<RumaResponse<get_tags::v3::Response>> {
    let stored = state.service.account_data().room_tags(&session.user_id, &request.user_id, &request.room_id).await?;
    // Stored tags were checked on the way in; one that no longer reads as a tag is left out.
    let tags: Tags = stored
        .into_iter()
        .filter_map(|(name, info)| Some((TagName::from(name), serde_json::from_value::<TagInfo>(info).ok()?)))
        .collect();
    Ok(RumaResponse(get_tags::v3::Response::new(tags)))
}

async fn set_tag(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<create_tag::v3::Request>,
) -> ApiResult<RumaResponse<create_tag::v3::Response>> {
    let content = serde_json::to_value(&request.tag_info)
        .and_then(serde_json::from_value::<JsonObject>)
        .map_err(|e| ApiError::BadJson(e.to_string()))?;
    let (user, room) = (&request.user_id, &request.room_id);
    state.service.set_room_tag(&session.user_id, user, room, &request.tag, content).await?;
    Ok(RumaResponse(create_tag::v3::Response::new()))
}

async fn delete_tag(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_tag::v3::Request>,
) -> ApiResult<RumaResponse<delete_tag::v3::Response>> {
    let (user, room) = (&request.user_id, &request.room_id);
    state.service.account_data().delete_room_tag(&session.user_id, user, room, &request.tag).await?;
    Ok(RumaResponse(delete_tag::v3::Response::new()))
}
