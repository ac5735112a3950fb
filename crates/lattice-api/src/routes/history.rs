//! Reading a room's past: `/context` around an event and `timestamp_to_event`.

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use lattice_service::rooms::{DEFAULT_CONTEXT_LIMIT, EventFilter};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, PathParams, QueryParams, parse_room};

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

#[derive(Deserialize)]
struct TimestampQuery {
    ts: u64,
    dir: String,
}

async fn timestamp_to_event(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<TimestampQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let forward = match query.dir.as_str() {
        "f" => true,
        "b" => false,
        other => return Err(ApiError::InvalidParam(format!("dir must be f or b, not {other:?}"))),
    };
    let found = state.service.rooms().timestamp_to_event(&session.user_id, &room_id, query.ts, forward).await?;
    Ok(Json(json!({ "event_id": found.event_id, "origin_server_ts": found.origin_server_ts })))
}
