//! Rooms: creating them, sending events, reading state, membership.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use lattice_service::delayed_events::ScheduleRequest;
use lattice_service::rooms::{CreateRoom, Preset, Txn};
use lattice_service::{JsonObject, ServiceError};
use ruma::api::client::membership::{
    ban_user, get_member_events, invite_user, join_room_by_id, join_room_by_id_or_alias, joined_members, joined_rooms,
    kick_user, leave_room, unban_user,
};
use ruma::api::client::message::send_message_event;
use ruma::api::client::read_marker::set_read_marker;
use ruma::api::client::receipt::create_receipt;
use ruma::api::client::redact::redact_event;
use ruma::api::client::room::create_room::v3::RoomPreset;
use ruma::api::client::room::{self, create_room, get_room_event};
use ruma::api::client::state::get_state_event_for_key::v3::StateEventFormat;
use ruma::api::client::state::{get_state_event_for_key, get_state_events, send_state_event};
use ruma::serde::Raw;
use ruma::{OwnedMxcUri, OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use super::delayed_events::{DelayQuery, schedule_event};
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
        .route("/_matrix/client/v3/rooms/{room_id}/state/{event_type}", get(get_state).put(put_state))
        // A trailing slash names the empty state key, as clients write it.
        .route("/_matrix/client/v3/rooms/{room_id}/state/{event_type}/", get(get_state).put(put_state))
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

/// A raw JSON object from ruma's request, as the service takes it.
fn object<T>(raw: &Raw<T>, what: &str) -> ApiResult<JsonObject> {
    raw.deserialize_as_unchecked().map_err(|e| ApiError::BadJson(format!("{what}: {e}")))
}

async fn create_room(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(body): Ruma<create_room::v3::Request>,
) -> ApiResult<RumaResponse<create_room::v3::Response>> {
    state.limits.room_creation_per_user.check(session.user_id.as_str())?;
    let public_visibility = match body.visibility {
        room::Visibility::Private => false,
        room::Visibility::Public => true,
        other => return Err(ApiError::BadJson(format!("unknown visibility {:?}", other.as_str()))),
    };
    // Not built yet: refused rather than silently ignored.
    if !body.invite_3pid.is_empty() {
        return Err(ServiceError::ThreepidDenied.into());
    }
    let preset = match body.preset {
        None => None,
        Some(RoomPreset::PrivateChat) => Some(Preset::PrivateChat),
        Some(RoomPreset::TrustedPrivateChat) => Some(Preset::TrustedPrivateChat),
        Some(RoomPreset::PublicChat) => Some(Preset::PublicChat),
        Some(other) => return Err(ApiError::BadJson(format!("unknown preset {:?}", other.as_str()))),
    };
    // Initial state is read as the client wrote it (ruma's typed events would drop what they do
    // not know); the service checks each entry.
    let initial_state = body
        .initial_state
        .iter()
        .map(|raw| {
            let entry: InitialState = raw.deserialize_as_unchecked().map_err(|e| ApiError::BadJson(e.to_string()))?;
            Ok((entry.kind, entry.state_key, entry.content))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let request = CreateRoom {
        preset,
        public_visibility,
        name: body.name,
        topic: body.topic,
        invite: body.invite,
        room_version: body.room_version.map(|version| version.to_string()),
        creation_content: body.creation_content.as_ref().map(|raw| object(raw, "creation_content")).transpose()?,
        initial_state,
        power_level_content_override: body
            .power_level_content_override
            .as_ref()
            .map(|raw| object(raw, "power_level_content_override"))
            .transpose()?,
        is_direct: body.is_direct,
        room_alias_name: body.room_alias_name,
        remote_invites_by_caller: false,
    };
    let room_id = state.service.create_room(&session.user_id, request).await?;
    Ok(RumaResponse(create_room::v3::Response::new(room_id)))
}

async fn joined_rooms(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<joined_rooms::v3::Request>,
) -> ApiResult<RumaResponse<joined_rooms::v3::Response>> {
    let rooms = state.service.rooms().joined_rooms(&session.user_id).await?;
    Ok(RumaResponse(joined_rooms::v3::Response::new(rooms)))
}

/// `PUT /rooms/{roomId}/send/{eventType}/{txnId}`; with `org.matrix.msc4140.delay` the event
/// is scheduled instead (MSC4140) and the answer is its `delay_id`.
async fn send(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(delay): QueryParams<DelayQuery>,
    Ruma(request): Ruma<send_message_event::v3::Request>,
) -> ApiResult<Response> {
    // ruma has checked that the content is a JSON object; its fields are the event type's own.
    let content: Value = request.body.deserialize_as_unchecked().map_err(|e| ApiError::BadJson(e.to_string()))?;
    let txn = Txn { device_id: session.device_id.as_str(), txn_id: request.txn_id.as_str() };
    let event_type = request.event_type.to_string();
    if let Some(delay_ms) = delay.delay_ms()? {
        let scheduled = ScheduleRequest {
            room_id: &request.room_id,
            event_type: &event_type,
            state_key: None,
            content,
            delay_ms,
            txn: Some(txn),
        };
        return Ok(schedule_event(&state, &session, scheduled).await?.into_response());
    }
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let rooms = state.service.rooms();
    let event_id = rooms.send_event(&session.user_id, &request.room_id, &event_type, None, content, Some(txn)).await?;
    Ok(RumaResponse(send_message_event::v3::Response::new(event_id)).into_response())
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

/// `GET /rooms/{roomId}/state/{eventType}[/{stateKey}]`: ruma reads a missing (or empty, after a
/// trailing slash) state key as the empty one.
async fn get_state(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_state_event_for_key::v3::Request>,
) -> ApiResult<RumaResponse<get_state_event_for_key::v3::Response>> {
    let (rooms, user) = (state.service.rooms(), &session.user_id);
    let (room_id, kind, key) = (&request.room_id, request.event_type.to_string(), request.state_key.as_str());
    let answer = match request.format {
        StateEventFormat::Content => rooms.state_content(user, room_id, &kind, key).await?,
        StateEventFormat::Event => rooms.state_event(user, room_id, &kind, key).await?,
        other => {
            return Err(ApiError::InvalidParam(format!("format must be content or event, not {:?}", other.as_str())));
        }
    };
    let raw = serde_json::value::to_raw_value(&answer).map_err(|e| ServiceError::Internal(e.to_string()))?;
    Ok(RumaResponse(get_state_event_for_key::v3::Response::new(raw)))
}

/// `PUT /rooms/{roomId}/state/{eventType}[/{stateKey}]`, the state key read as for `get_state`.
/// With `org.matrix.msc4140.delay` the event is scheduled instead (MSC4140); the state endpoint
/// has no transaction ID, so each such request schedules anew.
async fn put_state(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(delay): QueryParams<DelayQuery>,
    Ruma(request): Ruma<send_state_event::v3::Request>,
) -> ApiResult<Response> {
    let content =
        serde_json::to_value(object(&request.body, "content")?).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let (kind, key) = (request.event_type.to_string(), request.state_key.as_str());
    if let Some(delay_ms) = delay.delay_ms()? {
        let scheduled = ScheduleRequest {
            room_id: &request.room_id,
            event_type: &kind,
            state_key: Some(key),
            content,
            delay_ms,
            txn: None,
        };
        return Ok(schedule_event(&state, &session, scheduled).await?.into_response());
    }
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let rooms = state.service.rooms();
    let event_id = rooms.send_event(&session.user_id, &request.room_id, &kind, Some(key), content, None).await?;
    Ok(RumaResponse(send_state_event::v3::Response::new(event_id)).into_response())
}

async fn join(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<join_room_by_id::v3::Request>,
) -> ApiResult<RumaResponse<join_room_by_id::v3::Response>> {
    let room_id = join_room(&state, &session, request.room_id, &[], request.reason).await?;
    Ok(RumaResponse(join_room_by_id::v3::Response::new(room_id)))
}

/// `POST /join/{roomIdOrAlias}`: an alias resolves here (another server's through that
/// server); `via` (and the older `server_name`) name servers to join through when this server
/// is not in the room.
async fn join_by_id_or_alias(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<join_room_by_id_or_alias::v3::Request>,
) -> ApiResult<RumaResponse<join_room_by_id_or_alias::v3::Response>> {
    let mut via = request.via;
    let room_id = match OwnedRoomId::try_from(request.room_id_or_alias.clone()) {
        Ok(room_id) => room_id,
        Err(alias) => {
            let (room_id, servers) = state.service.resolve_alias(&alias).await?;
            via.extend(servers);
            room_id
        }
    };
    let room_id = join_room(&state, &session, room_id, &via, request.reason).await?;
    Ok(RumaResponse(join_room_by_id_or_alias::v3::Response::new(room_id)))
}

/// Joins here, or over federation through `via` when this server is not in the room.
async fn join_room(
    state: &AppState,
    session: &lattice_service::Session,
    room_id: OwnedRoomId,
    via: &[ruma::OwnedServerName],
    reason: Option<String>,
) -> ApiResult<OwnedRoomId> {
    state.limits.join_per_user.check(session.user_id.as_str())?;
    state.service.join(&session.user_id, &room_id, via, reason).await?;
    Ok(room_id)
}

async fn leave(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<leave_room::v3::Request>,
) -> ApiResult<RumaResponse<leave_room::v3::Response>> {
    let (user, room) = (&session.user_id, &request.room_id);
    state.service.leave(user, room, request.reason).await?;
    Ok(RumaResponse(leave_room::v3::Response::new()))
}

/// Sets another user's membership: an invite, a kick or a ban.
async fn on_target(
    state: &AppState,
    session: &lattice_service::Session,
    (room_id, target): (&OwnedRoomId, &OwnedUserId),
    reason: Option<String>,
    membership: &str,
) -> ApiResult<()> {
    state.service.rooms().set_membership(&session.user_id, room_id, target, membership, reason).await?;
    Ok(())
}

async fn invite(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<invite_user::v3::Request>,
) -> ApiResult<RumaResponse<invite_user::v3::Response>> {
    state.limits.invite_per_user.check(session.user_id.as_str())?;
    let invite_user::v3::InvitationRecipient::UserId(invitee) = request.recipient else {
        // Third-party invites are not built: the body needs a `user_id`, as before ruma read it.
        return Err(ApiError::BadJson("missing field `user_id`: invites by third-party ID are not supported".into()));
    };
    state.service.invite(&session.user_id, &request.room_id, &invitee.user_id, invitee.reason).await?;
    Ok(RumaResponse(invite_user::v3::Response::new()))
}

async fn kick(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<kick_user::v3::Request>,
) -> ApiResult<RumaResponse<kick_user::v3::Response>> {
    on_target(&state, &session, (&request.room_id, &request.user_id), request.reason, "leave").await?;
    Ok(RumaResponse(kick_user::v3::Response::new()))
}

async fn ban(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<ban_user::v3::Request>,
) -> ApiResult<RumaResponse<ban_user::v3::Response>> {
    on_target(&state, &session, (&request.room_id, &request.user_id), request.reason, "ban").await?;
    Ok(RumaResponse(ban_user::v3::Response::new()))
}

async fn unban(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<unban_user::v3::Request>,
) -> ApiResult<RumaResponse<unban_user::v3::Response>> {
    state.service.rooms().unban(&session.user_id, &request.room_id, &request.user_id, request.reason).await?;
    Ok(RumaResponse(unban_user::v3::Response::new()))
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
    QueryParams(query): QueryParams<EventQuery>,
    Ruma(request): Ruma<get_room_event::v3::Request>,
) -> ApiResult<RumaResponse<get_room_event::v3::Response>> {
    let (rooms, room_id, event_id) = (state.service.rooms(), &request.room_id, request.event_id.as_str());
    let event = match query.include_unredacted_content {
        true => rooms.room_event_unredacted(&session.user_id, room_id, event_id).await?,
        false => rooms.room_event(&session.user_id, room_id, event_id).await?,
    };
    Ok(RumaResponse(get_room_event::v3::Response::new(crate::typed::raw(&event)?)))
}

async fn members(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_member_events::v3::Request>,
) -> ApiResult<RumaResponse<get_member_events::v3::Response>> {
    let (rooms, room_id) = (state.service.rooms(), &request.room_id);
    let membership = request.membership.as_ref().map(|m| m.as_str());
    let not_membership = request.not_membership.as_ref().map(|m| m.as_str());
    let chunk = match request.at.as_deref().map(lattice_service::rooms::HistoryToken::parse).transpose()? {
        Some(at) => rooms.members_at(&session.user_id, room_id, at, membership, not_membership).await?,
        None => rooms.members(&session.user_id, room_id, membership, not_membership).await?,
    };
    let chunk = chunk.iter().map(crate::typed::raw).collect::<Result<Vec<_>, _>>()?;
    Ok(RumaResponse(get_member_events::v3::Response::new(chunk)))
}

async fn joined_members(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<joined_members::v3::Request>,
) -> ApiResult<RumaResponse<joined_members::v3::Response>> {
    let members = state.service.rooms().members(&session.user_id, &request.room_id, Some("join"), None).await?;
    let mut joined = std::collections::BTreeMap::new();
    for member in members {
        let Some(Ok(user)) = member["state_key"].as_str().map(OwnedUserId::try_from) else { continue };
        let mut profile = joined_members::v3::RoomMember::new();
        profile.display_name = member["content"]["displayname"].as_str().map(str::to_owned);
        profile.avatar_url = member["content"]["avatar_url"].as_str().map(OwnedMxcUri::from);
        joined.insert(user, profile);
    }
    Ok(RumaResponse(joined_members::v3::Response::new(joined)))
}

async fn redact(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<redact_event::v3::Request>,
) -> ApiResult<RumaResponse<redact_event::v3::Response>> {
    state.limits.message_per_user.check(session.user_id.as_str())?;
    let mut content = json!({ "redacts": request.event_id });
    if let Some(reason) = request.reason {
        content["reason"] = json!(reason);
    }
    let txn = Txn { device_id: session.device_id.as_str(), txn_id: request.txn_id.as_str() };
    let redaction = state
        .service
        .rooms()
        .send_event(&session.user_id, &request.room_id, "m.room.redaction", None, content, Some(txn))
        .await?;
    Ok(RumaResponse(redact_event::v3::Response::new(redaction)))
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
    state.service.set_typing(&session.user_id, &room_id, body.typing, timeout).await?;
    Ok(Json(json!({})))
}

async fn receipt(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<create_receipt::v3::Request>,
) -> ApiResult<RumaResponse<create_receipt::v3::Response>> {
    let (room_id, event_id) = (&request.room_id, request.event_id.as_str());
    // The service checks the type and the thread against the rules for each receipt type.
    let (receipt_type, thread) = (request.receipt_type.to_string(), request.thread.as_str().map(str::to_owned));
    state.service.set_receipt(&session.user_id, room_id, &receipt_type, event_id, thread).await?;
    Ok(RumaResponse(create_receipt::v3::Response::new()))
}

async fn read_markers(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_read_marker::v3::Request>,
) -> ApiResult<RumaResponse<set_read_marker::v3::Response>> {
    state
        .service
        .rooms()
        .set_read_markers(
            &session.user_id,
            &request.room_id,
            request.fully_read.as_ref().map(|id| id.as_str()),
            request.read_receipt.as_ref().map(|id| id.as_str()),
            request.private_read_receipt.as_ref().map(|id| id.as_str()),
        )
        .await?;
    if let Some(event_id) = &request.read_receipt {
        state.service.announce_read_receipt(&session.user_id, &request.room_id, event_id.as_str(), None).await;
    }
    Ok(RumaResponse(set_read_marker::v3::Response::new()))
}
