//! `/sync` and `/rooms/{roomId}/messages`.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use lattice_service::rooms::{MAX_TIMELINE_LIMIT, SyncRequest, parse_token};
use serde::Deserialize;
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, PathParams, QueryParams, parse_room};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/v3/sync", get(sync))
        .route("/_matrix/client/v3/rooms/{room_id}/messages", get(messages))
}

#[derive(Deserialize)]
struct SyncQuery {
    since: Option<String>,
    timeout: Option<u64>,
    filter: Option<String>,
}

/// The timeline limit a filter (inline JSON or a stored filter's ID) asks for.
async fn timeline_limit(
    state: &AppState,
    session: &lattice_service::Session,
    filter: &str,
) -> ApiResult<Option<usize>> {
    let filter: Value = if filter.trim_start().starts_with('{') {
        serde_json::from_str(filter).map_err(|e| ApiError::BadJson(format!("invalid inline filter: {e}")))?
    } else {
        let stored = state.service.filter(&session.user_id, &session.user_id, filter).await?;
        serde_json::to_value(stored).map_err(|e| ApiError::BadJson(e.to_string()))?
    };
    Ok(filter["room"]["timeline"]["limit"].as_u64().map(|n| n.min(MAX_TIMELINE_LIMIT as u64) as usize))
}

async fn sync(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(query): QueryParams<SyncQuery>,
) -> ApiResult<Json<Value>> {
    let since = query.since.as_deref().map(parse_token).transpose()?;
    let timeline_limit = match &query.filter {
        Some(filter) => timeline_limit(&state, &session, filter).await?,
        None => None,
    };
    let request = SyncRequest { since, timeout: Duration::from_millis(query.timeout.unwrap_or(0)), timeline_limit };
    Ok(Json(state.service.sync(&session.user_id, request).await?))
}

#[derive(Deserialize)]
struct MessagesQuery {
    from: Option<String>,
    dir: String,
    limit: Option<usize>,
}

async fn messages(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<MessagesQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let backward = match query.dir.as_str() {
        "b" => true,
        "f" => false,
        other => return Err(ApiError::InvalidParam(format!("dir must be b or f, not {other:?}"))),
    };
    let from = query.from.as_deref().map(parse_token).transpose()?;
    Ok(Json(state.service.messages(&session.user_id, &room_id, from, backward, query.limit.unwrap_or(10)).await?))
}
