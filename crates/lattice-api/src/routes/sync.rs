//! `/sync`, `/rooms/{roomId}/messages`, relations, threads and to-device messages.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::{get, put};
use lattice_service::presence::PresenceState;
use lattice_service::rooms::{EventFilter, HistoryToken, RelationsQuery, SyncFilter};
use lattice_service::sync::{SyncRequest, SyncToken, parse_token};
use lattice_service::{JsonObject, Session, ToDeviceMessages};
use ruma::api::Direction;
use ruma::api::client::relations::{
    get_relating_events, get_relating_events_with_rel_type, get_relating_events_with_rel_type_and_event_type,
};
use ruma::api::client::threads::get_threads;
use ruma::api::client::threads::get_threads::v1::IncludeThreads;
use ruma::api::client::to_device::send_event_to_device;
use ruma::events::AnyMessageLikeEvent;
use ruma::serde::Raw;
use ruma::{OwnedEventId, OwnedRoomId, UInt};
use serde::Deserialize;
use serde_json::Value;

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, PathParams, QueryParams, parse_room};
use crate::typed::{Ruma, RumaResponse};

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
    set_presence: Option<String>,
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
        set_presence: match query.set_presence.as_deref() {
            None => PresenceState::Online,
            Some(given) => PresenceState::parse(given).ok_or_else(|| {
                ApiError::InvalidParam(format!("set_presence must be online, unavailable or offline, not {given:?}"))
            })?,
        },
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
    let page = state.service.messages(&session.user_id, &room_id, (from, to), backward, limit, &filter).await?;
    Ok(Json(page.response))
}

/// A relations request's shared parts, from any of ruma's three relation endpoints.
struct RelationsRequest {
    room_id: OwnedRoomId,
    event_id: OwnedEventId,
    from: Option<String>,
    to: Option<String>,
    limit: Option<UInt>,
    dir: Direction,
}

async fn list_relations(
    state: AppState,
    session: Session,
    request: RelationsRequest,
    (rel_type, event_type): (Option<&str>, Option<&str>),
) -> ApiResult<(Vec<Raw<AnyMessageLikeEvent>>, Option<String>)> {
    let query = RelationsQuery {
        rel_type,
        event_type,
        from: request.from.as_deref().map(HistoryToken::parse).transpose()?,
        to: request.to.as_deref().map(HistoryToken::parse).transpose()?,
        limit: request.limit.map_or(50, |l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX)),
        backward: request.dir == Direction::Backward,
    };
    let rooms = state.service.rooms();
    let page = rooms.relations(&session.user_id, &request.room_id, request.event_id.as_str(), query).await?;
    page_parts(page)
}

/// A page the service built (`chunk`, and `next_batch` when there is more) as ruma's parts.
fn page_parts<T>(page: Value) -> ApiResult<(Vec<Raw<T>>, Option<String>)> {
    let chunk = page["chunk"].as_array().map(Vec::as_slice).unwrap_or_default();
    let chunk = chunk.iter().map(crate::typed::raw).collect::<Result<Vec<_>, _>>()?;
    Ok((chunk, page["next_batch"].as_str().map(str::to_owned)))
}

async fn relations(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_relating_events::v1::Request>,
) -> ApiResult<RumaResponse<get_relating_events::v1::Response>> {
    let get_relating_events::v1::Request { room_id, event_id, from, to, limit, dir, .. } = request;
    let request = RelationsRequest { room_id, event_id, from, to, limit, dir };
    let (chunk, next_batch) = list_relations(state, session, request, (None, None)).await?;
    let mut response = get_relating_events::v1::Response::new(chunk);
    response.next_batch = next_batch;
    Ok(RumaResponse(response))
}

async fn relations_by_type(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> ApiResult<RumaResponse<get_relating_events_with_rel_type::v1::Response>> {
    let get_relating_events_with_rel_type::v1::Request { room_id, event_id, rel_type, from, to, limit, dir, .. } =
        request;
    let request = RelationsRequest { room_id, event_id, from, to, limit, dir };
    let rel_type = rel_type.to_string();
    let (chunk, next_batch) = list_relations(state, session, request, (Some(&rel_type), None)).await?;
    let mut response = get_relating_events_with_rel_type::v1::Response::new(chunk);
    response.next_batch = next_batch;
    Ok(RumaResponse(response))
}

async fn relations_by_event_type(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> ApiResult<RumaResponse<get_relating_events_with_rel_type_and_event_type::v1::Response>> {
    let get_relating_events_with_rel_type_and_event_type::v1::Request {
        room_id,
        event_id,
        rel_type,
        event_type,
        from,
        to,
        limit,
        dir,
        ..
    } = request;
    let request = RelationsRequest { room_id, event_id, from, to, limit, dir };
    let (rel_type, event_type) = (rel_type.to_string(), event_type.to_string());
    let (chunk, next_batch) = list_relations(state, session, request, (Some(&rel_type), Some(&event_type))).await?;
    let mut response = get_relating_events_with_rel_type_and_event_type::v1::Response::new(chunk);
    response.next_batch = next_batch;
    Ok(RumaResponse(response))
}

async fn threads(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_threads::v1::Request>,
) -> ApiResult<RumaResponse<get_threads::v1::Response>> {
    let participated = match request.include {
        IncludeThreads::All => false,
        IncludeThreads::Participated => true,
        other => {
            let other = other.as_str().to_owned();
            return Err(ApiError::InvalidParam(format!("include must be all or participated, not {other:?}")));
        }
    };
    let from = request.from.as_deref().map(parse_token).transpose()?;
    let limit = request.limit.map_or(50, |l| usize::try_from(u64::from(l)).unwrap_or(usize::MAX));
    let page = state.service.rooms().threads(&session.user_id, &request.room_id, participated, from, limit).await?;
    let (chunk, next_batch) = page_parts(page)?;
    let mut response = get_threads::v1::Response::new(chunk);
    response.next_batch = next_batch;
    Ok(RumaResponse(response))
}

async fn send_to_device(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<send_event_to_device::v3::Request>,
) -> ApiResult<RumaResponse<send_event_to_device::v3::Response>> {
    state.limits.to_device_per_user.check(session.user_id.as_str())?;
    let mut messages = ToDeviceMessages::new();
    for (user, devices) in request.messages {
        let mut by_device = std::collections::BTreeMap::new();
        for (device, content) in devices {
            // `*` for all of the user's devices, as the service reads it.
            let device = device.to_string();
            let content: JsonObject = content
                .deserialize_as_unchecked()
                .map_err(|e| ApiError::BadJson(format!("a message must be a JSON object: {e}")))?;
            by_device.insert(device, content);
        }
        messages.insert(user, by_device);
    }
    let (event_type, txn_id) = (request.event_type.to_string(), request.txn_id.to_string());
    let device = session.device_id.as_str();
    state.service.send_to_device(&session.user_id, device, &event_type, &txn_id, messages).await?;
    Ok(RumaResponse(send_event_to_device::v3::Response::new()))
}
