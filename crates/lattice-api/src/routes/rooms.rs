//! Rooms: creating them, sending events, reading state, membership.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post, put};
use lattice_service::rooms::{CreateRoom, Preset, Txn};
use lattice_service::{JsonObject, ServiceError};
use ruma::api::client::membership::joined_rooms;
use ruma::api::client::state::get_state_events;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, JsonBody, PathParams, QueryParams};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/createRoom", post(create_room))
        .route("/_matrix/client/v3/joined_rooms", get(joined_rooms))
        .route("/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}", put(send))
        .route("/_matrix/client/v3/rooms/{room_id}/redact/{event_id}/{txn_id}", put(redact))
        .route("/_matrix/client/v3/rooms/{room_id}/state", get(all_state))
        .route(
            "/_matrix/client/v3/rooms/{room_id}/state/{event_type}",
            get(get_state_empty_key).put(put_state_empty_key),
        )
        // A trailing slash names the empty state key, as clients write it.
        .route(
            "/_matrix/client/v3/rooms/{room_id}/state/{event_type}/",
            get(get_state_empty_key).put(put_state_empty_key),
        )
        .route("/_matrix/client/v3/rooms/{room_id}/state/{event_type}/{state_key}", get(get_state).put(put_state))
        .route("/_matrix/client/v3/rooms/{room_id}/event/{event_id}", get(get_event))
        .route("/_matrix/client/v3/rooms/{room_id}/members", get(members))
        .route("/_matrix/client/v3/rooms/{room_id}/typing/{user_id}", put(typing))
        .route("/_matrix/client/v3/rooms/{room_id}/receipt/{receipt_type}/{event_id}", post(receipt))
        .route("/_matrix/client/v3/rooms/{room_id}/read_markers", post(read_markers))
        .route("/_matrix/client/v3/rooms/{room_id}/joined_members", get(joined_members))
        .route("/_matrix/client/v3/rooms/{room_id}/join", post(join))
        .route("/_matrix/client/v3/join/{room_id_or_alias}", post(join_by_id_or_alias))
        .route("/_matrix/client/v3/rooms/{room_id}/leave", post(leave))
        .route("/_matrix/client/v3/rooms/{room_id}/invite", post(invite))
        .route("/_matrix/client/v3/rooms/{room_id}/kick", post(kick))
        .route("/_matrix/client/v3/rooms/{room_id}/ban", post(ban))
        .route("/_matrix/client/v3/rooms/{room_id}/unban", post(unban))
}

fn parse_room(room_id: &str) -> ApiResult<OwnedRoomId> {
    if room_id.starts_with('#') {
        return Err(ApiError::InvalidParam(format!("{room_id} is a room alias; this endpoint takes a room ID")));
    }
    crate::extract::parse_room(room_id)
}

#[derive(Deserialize)]
struct InitialState {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state_key: String,
    content: JsonObject,
}

#[derive(Deserialize)]
struct CreateRoomBody {
    preset: Option<String>,
    visibility: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<OwnedUserId>,
    room_version: Option<String>,
    creation_content: Option<JsonObject>,
    #[serde(default)]
    initial_state: Vec<InitialState>,
    power_level_content_override: Option<JsonObject>,
    #[serde(default)]
    is_direct: bool,
    room_alias_name: Option<String>,
    #[serde(default)]
    invite_3pid: Vec<Value>,
}

async fn create_room(
    State(state): State<AppState>,
    Auth(session): Auth,
    JsonBody(body): JsonBody<CreateRoomBody>,
) -> ApiResult<Json<Value>> {
    state.limits.room_creation_per_user.check(session.user_id.as_str())?;
    let public_visibility = match body.visibility.as_deref() {
        None | Some("private") => false,
        Some("public") => true,
        Some(other) => return Err(ApiError::BadJson(format!("unknown visibility {other:?}"))),
    };
    // Not built yet: refused rather than silently ignored.
    if !body.invite_3pid.is_empty() {
        return Err(ServiceError::ThreepidDenied.into());
    }
    let preset = match body.preset.as_deref() {
        None => None,
        Some("private_chat") => Some(Preset::PrivateChat),
        Some("trusted_private_chat") => Some(Preset::TrustedPrivateChat),
        Some("public_chat") => Some(Preset::PublicChat),
        Some(other) => return Err(ApiError::BadJson(format!("unknown preset {other:?}"))),
    };
    let request = CreateRoom {
        preset,
        public_visibility,
        name: body.name,
        topic: body.topic,
        invite: body.invite,
        room_version: body.room_version,
        creation_content: body.creation_content,
        initial_state: body.initial_state.into_iter().map(|s| (s.kind, s.state_key, s.content)).collect(),
        power_level_content_override: body.power_level_content_override,
        is_direct: body.is_direct,
        room_alias_name: body.room_alias_name,
    };
    let room_id = state.service.rooms().create_room(&session.user_id, request).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn joined_rooms(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<joined_rooms::v3::Request>,
) -> ApiResult<RumaResponse<joined_rooms::v3::Response>> {
    let rooms = state.service.rooms().joined_rooms(&session.user_id).await?;
    Ok(RumaResponse(joined_rooms::v3::Response::new(rooms)))
}

async fn send(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_type, txn_id)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let room_id = parse_room(&room_id)?;
    let content = serde_json::to_value(content).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let txn = Txn { device_id: session.device_id.as_str(), txn_id: &txn_id };
    let event_id =
        state.service.rooms().send_event(&session.user_id, &room_id, &event_type, None, content, Some(txn)).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

async fn all_state(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_state_events::v3::Request>,
) -> ApiResult<RumaResponse<get_state_events::v3::Response>> {
    let events = state.service.rooms().room_state(&session.user_id, &request.room_id).await?;
    let raw = events.iter().map(crate::typed::raw).collect::<Result<Vec<_>, _>>()?;
    Ok(RumaResponse(get_state_events::v3::Response::new(raw)))
}

async fn read_state(
    state: &AppState,
    session: &lattice_service::Session,
    room_id: &str,
    kind: &str,
    key: &str,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(room_id)?;
    Ok(Json(state.service.rooms().state_content(&session.user_id, &room_id, kind, key).await?))
}

async fn get_state(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, kind, key)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    read_state(&state, &session, &room_id, &kind, &key).await
}

async fn get_state_empty_key(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, kind)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    read_state(&state, &session, &room_id, &kind, "").await
}

async fn write_state(
    state: &AppState,
    session: &lattice_service::Session,
    room_id: &str,
    kind: &str,
    key: &str,
    content: JsonObject,
) -> ApiResult<Json<Value>> {
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let room_id = parse_room(room_id)?;
    let content = serde_json::to_value(content).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let event_id = state.service.rooms().send_event(&session.user_id, &room_id, kind, Some(key), content, None).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

async fn put_state(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, kind, key)): PathParams<(String, String, String)>,
    JsonBody(content): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    write_state(&state, &session, &room_id, &kind, &key, content).await
}

async fn put_state_empty_key(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, kind)): PathParams<(String, String)>,
    JsonBody(content): JsonBody<JsonObject>,
) -> ApiResult<Json<Value>> {
    write_state(&state, &session, &room_id, &kind, "", content).await
}

#[derive(Deserialize)]
struct ReasonBody {
    reason: Option<String>,
}

#[derive(Deserialize)]
struct TargetBody {
    user_id: OwnedUserId,
    reason: Option<String>,
}

async fn join(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    join_room(&state, &session, room_id, &[], body.reason).await
}

/// `POST /join/{roomIdOrAlias}`: local aliases resolve here. `via` and `server_name` name servers
/// to join through; they are checked, and matter once joins over federation exist.
async fn join_by_id_or_alias(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(target): PathParams<String>,
    QueryParams(query): QueryParams<Vec<(String, String)>>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let mut via = Vec::new();
    for (_, server) in query.iter().filter(|(key, _)| key == "via" || key == "server_name") {
        via.push(
            ruma::OwnedServerName::try_from(server.as_str())
                .map_err(|e| ApiError::InvalidParam(format!("invalid server name {server:?}: {e}")))?,
        );
    }
    let room_id = if target.starts_with('#') {
        let alias = crate::extract::parse_alias(&target)?;
        let (room_id, servers) = state.service.resolve_alias(&alias).await?;
        via.extend(servers);
        room_id
    } else {
        parse_room(&target)?
    };
    join_room(&state, &session, room_id, &via, body.reason).await
}

/// Joins here, or over federation through `via` when this server is not in the room.
async fn join_room(
    state: &AppState,
    session: &lattice_service::Session,
    room_id: OwnedRoomId,
    via: &[ruma::OwnedServerName],
    reason: Option<String>,
) -> ApiResult<Json<Value>> {
    state.limits.join_per_user.check(session.user_id.as_str())?;
    state.service.join(&session.user_id, &room_id, via, reason).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

async fn leave(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.rooms().set_membership(&session.user_id, &room_id, &session.user_id, "leave", body.reason).await?;
    Ok(Json(json!({})))
}

async fn on_target(
    state: AppState,
    session: lattice_service::Session,
    room_id: String,
    body: TargetBody,
    membership: &str,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.rooms().set_membership(&session.user_id, &room_id, &body.user_id, membership, body.reason).await?;
    Ok(Json(json!({})))
}

async fn invite(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    state.limits.invite_per_user.check(session.user_id.as_str())?;
    on_target(state, session, room_id, body, "invite").await
}

async fn kick(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    on_target(state, session, room_id, body, "leave").await
}

async fn ban(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    on_target(state, session, room_id, body, "ban").await
}

async fn unban(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.rooms().unban(&session.user_id, &room_id, &body.user_id, body.reason).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct EventQuery {
    /// MSC2815: server admins may ask for the content a redaction removed.
    #[serde(rename = "fi.mau.msc2815.include_unredacted_content", default)]
    include_unredacted_content: bool,
}

async fn get_event(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<EventQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    if query.include_unredacted_content {
        return Ok(Json(state.service.rooms().room_event_unredacted(&session.user_id, &room_id, &event_id).await?));
    }
    Ok(Json(state.service.rooms().room_event(&session.user_id, &room_id, &event_id).await?))
}

#[derive(Deserialize)]
struct MembersQuery {
    membership: Option<String>,
    not_membership: Option<String>,
    at: Option<String>,
}

async fn members(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<MembersQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let (membership, not_membership) = (query.membership.as_deref(), query.not_membership.as_deref());
    let chunk = match query.at.as_deref().map(lattice_service::rooms::HistoryToken::parse).transpose()? {
        Some(at) => {
            state.service.rooms().members_at(&session.user_id, &room_id, at, membership, not_membership).await?
        }
        None => state.service.rooms().members(&session.user_id, &room_id, membership, not_membership).await?,
    };
    Ok(Json(json!({ "chunk": chunk })))
}

async fn joined_members(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let members = state.service.rooms().members(&session.user_id, &room_id, Some("join"), None).await?;
    let mut joined = serde_json::Map::new();
    for member in members {
        let mut profile = serde_json::Map::new();
        for (from, to) in [("displayname", "display_name"), ("avatar_url", "avatar_url")] {
            if let Some(value) = member["content"][from].as_str() {
                profile.insert(to.into(), json!(value));
            }
        }
        if let Some(user) = member["state_key"].as_str() {
            joined.insert(user.to_owned(), Value::Object(profile));
        }
    }
    Ok(Json(json!({ "joined": joined })))
}

async fn redact(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, event_id, txn_id)): PathParams<(String, String, String)>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let room_id = parse_room(&room_id)?;
    let event_id =
        ruma::OwnedEventId::try_from(event_id).map_err(|e| ApiError::InvalidParam(format!("invalid event ID: {e}")))?;
    let mut content = json!({ "redacts": event_id });
    if let Some(reason) = body.reason {
        content["reason"] = json!(reason);
    }
    let txn = Txn { device_id: session.device_id.as_str(), txn_id: &txn_id };
    let redaction = state
        .service
        .rooms()
        .send_event(&session.user_id, &room_id, "m.room.redaction", None, content, Some(txn))
        .await?;
    Ok(Json(json!({ "event_id": redaction })))
}

#[derive(Deserialize)]
struct TypingBody {
    typing: bool,
    /// Milliseconds.
    timeout: Option<u64>,
}

async fn typing(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, user_id)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<TypingBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    if user_id != session.user_id.as_str() {
        return Err(ServiceError::Forbidden("you can only set your own typing state".into()).into());
    }
    let timeout = std::time::Duration::from_millis(body.timeout.unwrap_or(30_000));
    state.service.rooms().set_typing(&session.user_id, &room_id, body.typing, timeout).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct ReceiptBody {
    thread_id: Option<String>,
}

async fn receipt(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((room_id, receipt_type, event_id)): PathParams<(String, String, String)>,
    JsonBody(body): JsonBody<ReceiptBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state.service.rooms().set_receipt(&session.user_id, &room_id, &receipt_type, &event_id, body.thread_id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct ReadMarkersBody {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<String>,
    #[serde(rename = "m.read")]
    read: Option<String>,
    #[serde(rename = "m.read.private")]
    read_private: Option<String>,
}

async fn read_markers(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<ReadMarkersBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state
        .service
        .rooms()
        .set_read_markers(
            &session.user_id,
            &room_id,
            body.fully_read.as_deref(),
            body.read.as_deref(),
            body.read_private.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}
