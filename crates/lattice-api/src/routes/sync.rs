//! `/sync`, `/rooms/{roomId}/messages`, relations, threads and to-device messages.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::{get, put};
use lattice_service::rooms::{EventFilter, HistoryToken, RelationsQuery, SyncFilter};
use lattice_service::sync::{SyncRequest, SyncToken, parse_token};
use lattice_service::{Session, ToDeviceMessages};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, PathParams, QueryParams, parse_room};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/sync", get(sync))
        .route("/_matrix/client/v3/rooms/{room_id}/messages", get(messages))
        .route("/_matrix/client/v1/rooms/{room_id}/relations/{event_id}", get(relations))
        .route("/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}", get(relations_by_type))
        .route(
            "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
            get(relations_by_event_type),
        )
        .route("/_matrix/client/v1/rooms/{room_id}/threads", get(threads))
        .route("/_matrix/client/v3/sendToDevice/{event_type}/{txn_id}", put(send_to_device))
}

#[derive(Deserialize)]
struct SyncQuery {
    since: Option<String>,
    timeout: Option<u64>,
    filter: Option<String>,
    #[serde(default)]
    full_state: bool,
}

/// A filter given inline as JSON or as the ID of a stored filter.
async fn filter_json(state: &AppState, session: &Session, filter: &str) -> ApiResult<Value> {
    if filter.trim_start().starts_with('{') {
        return serde_json::from_str(filter).map_err(|e| ApiError::BadJson(format!("invalid inline filter: {e}")));
    }
    let stored = state.service.account_data().filter(&session.user_id, &session.user_id, filter).await?;
    serde_json::to_value(stored).map_err(|e| ApiError::BadJson(e.to_string()))
}

async fn sync(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(query): QueryParams<SyncQuery>,
) -> ApiResult<Json<Value>> {
    let since = query.since.as_deref().map(SyncToken::parse).transpose()?;
    let filter = match &query.filter {
        Some(filter) => SyncFilter::from_json(filter_json(&state, &session, filter).await?)?,
        None => SyncFilter::default(),
    };
    let request = SyncRequest {
        since,
        timeout: Duration::from_millis(query.timeout.unwrap_or(0)),
        device_id: Some(session.device_id.to_string()),
        filter,
        full_state: query.full_state,
    };
    Ok(Json(state.service.sync().sync(&session.user_id, request).await?))
}

#[derive(Deserialize)]
struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: String,
    limit: Option<usize>,
    filter: Option<String>,
}

fn direction(dir: &str) -> ApiResult<bool> {
    match dir {
        "b" => Ok(true),
        "f" => Ok(false),
        other => Err(ApiError::InvalidParam(format!("dir must be b or f, not {other:?}"))),
    }
}

async fn messages(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<MessagesQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let backward = direction(&query.dir)?;
    let from = query.from.as_deref().map(HistoryToken::parse).transpose()?;
    let to = query.to.as_deref().map(HistoryToken::parse).transpose()?;
    let filter = match &query.filter {
        Some(filter) => EventFilter::from_json(filter_json(&state, &session, filter).await?)?,
        None => EventFilter::default(),
    };
    let limit = query.limit.or(filter.limit.map(|l| l as usize)).unwrap_or(10);
    let page = state.service.rooms().messages(&session.user_id, &room_id, (from, to), backward, limit, &filter).await?;
    Ok(Json(page.response))
}

#[derive(Deserialize)]
struct RelationsParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    dir: Option<String>,
}

async fn list_relations(
    state: AppState,
    session: Session,
    (room_id, event_id): (String, String),
    (rel_type, event_type): (Option<&str>, Option<&str>),
    params: RelationsParams,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let query = RelationsQuery {
        rel_type,
        event_type,
        from: params.from.as_deref().map(HistoryToken::parse).transpose()?,
        to: params.to.as_deref().map(HistoryToken::parse).transpose()?,
        limit: params.limit.unwrap_or(50),
        backward: direction(params.dir.as_deref().unwrap_or("b"))?,
    };
    Ok(Json(state.service.rooms().relations(&session.user_id, &room_id, &event_id, query).await?))
}

async fn relations(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(path): PathParams<(String, String)>,
    QueryParams(params): QueryParams<RelationsParams>,
) -> ApiResult<Json<Value>> {
    list_relations(state, session, path, (None, None), params).await
}

async fn relations_by_type(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_id, rel_type)): PathParams<(String, String, String)>,
    QueryParams(params): QueryParams<RelationsParams>,
) -> ApiResult<Json<Value>> {
    list_relations(state, session, (room_id, event_id), (Some(&rel_type), None), params).await
}

async fn relations_by_event_type(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_id, rel_type, event_type)): PathParams<(String, String, String, String)>,
    QueryParams(params): QueryParams<RelationsParams>,
) -> ApiResult<Json<Value>> {
    list_relations(state, session, (room_id, event_id), (Some(&rel_type), Some(&event_type)), params).await
}

#[derive(Deserialize)]
struct ThreadsQuery {
    include: Option<String>,
    from: Option<String>,
    limit: Option<usize>,
}

async fn threads(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<ThreadsQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let participated = match query.include.as_deref() {
        None | Some("all") => false,
        Some("participated") => true,
        Some(other) => {
            return Err(ApiError::InvalidParam(format!("include must be all or participated, not {other:?}")));
        }
    };
    let from = query.from.as_deref().map(parse_token).transpose()?;
    let page = state
        .service
        .rooms()
        .threads(&session.user_id, &room_id, participated, from, query.limit.unwrap_or(50))
        .await?;
    Ok(Json(page))
}

#[derive(Deserialize)]
struct ToDeviceBody {
    messages: ToDeviceMessages,
}

async fn send_to_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((event_type, txn_id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<ToDeviceBody>,
) -> ApiResult<Json<Value>> {
    state.limits.to_device_per_user.check(session.user_id.as_str())?;
    state
        .service
        .send_to_device(&session.user_id, session.device_id.as_str(), &event_type, &txn_id, body.messages)
        .await?;
    Ok(Json(json!({})))
}
