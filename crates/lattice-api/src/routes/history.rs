//! Reading a room's past: `/context` around an event and `timestamp_to_event`.

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use lattice_service::ServiceError;
use lattice_service::rooms::{DEFAULT_CONTEXT_LIMIT, EventFilter};
use ruma::api::Direction;
use ruma::api::client::room::get_event_by_timestamp;
use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, UInt};
use serde::Deserialize;
use serde_json::Value;

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, PathParams, QueryParams, parse_room};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/rooms/{room_id}/context/{event_id}", get(context))
        .route("/_matrix/client/v1/rooms/{room_id}/timestamp_to_event", get(timestamp_to_event))
}

#[derive(Deserialize)]
struct ContextQuery {
    limit: Option<usize>,
    /// A `RoomEventFilter` as JSON.
    filter: Option<String>,
}

async fn context(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<ContextQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let filter = match &query.filter {
        Some(filter) => EventFilter::from_json(
            serde_json::from_str(filter).map_err(|e| ApiError::BadJson(format!("invalid filter: {e}")))?,
        )?,
        None => EventFilter::default(),
    };
    let limit = query.limit.unwrap_or(DEFAULT_CONTEXT_LIMIT);
    Ok(Json(state.service.rooms().event_context(&session.user_id, &room_id, &event_id, limit, &filter).await?))
}

async fn timestamp_to_event(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_event_by_timestamp::v1::Request>,
) -> ApiResult<RumaResponse<get_event_by_timestamp::v1::Response>> {
    let forward = request.dir == Direction::Forward;
    let ts = request.ts.get().into();
    let found = state.service.timestamp_to_event(&session.user_id, &request.room_id, ts, forward).await?;
    let event_id = OwnedEventId::try_from(found.event_id).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let origin_server_ts = MilliSecondsSinceUnixEpoch(UInt::new_saturating(found.origin_server_ts));
    Ok(RumaResponse(get_event_by_timestamp::v1::Response::new(event_id, origin_server_ts)))
}
