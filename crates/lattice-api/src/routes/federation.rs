//! The server-server surface built so far: this server's keys (`/_matrix/key/v2/server`), the
//! notary (`/_matrix/key/v2/query`), `/_matrix/federation/v1/version`, and the profile query.
//! With federation off (no `[federation] listen`), every route here answers
//! `404 M_UNRECOGNIZED`, as unbuilt endpoints do.
//!
//! Every `/_matrix/federation/*` route except `/version` (which the spec leaves
//! unauthenticated) takes [`ServerAuth`], which checks the `X-Matrix` signature.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::routing::{get, post, put};
use lattice_federation::{FederationError, KeyCache};
use lattice_service::ServiceError;
use ruma::{CanonicalJsonValue, OwnedEventId, OwnedServerName};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ClientIp, JsonBody, PathParams, QueryParams, parse_room, parse_user};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/query/{server_name}", get(query_one))
        .route("/_matrix/key/v2/query", post(query_many))
        .route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/federation/v1/query/profile", get(query_profile))
        .route("/_matrix/federation/v1/query/directory", get(query_directory))
        .route("/_matrix/federation/v1/send/{txn_id}", put(send_transaction))
        .route("/_matrix/federation/v1/make_join/{room_id}/{user_id}", get(make_join))
        .route("/_matrix/federation/v1/make_leave/{room_id}/{user_id}", get(make_leave))
        .route("/_matrix/federation/v2/send_join/{room_id}/{event_id}", put(send_join))
        .route("/_matrix/federation/v2/send_leave/{room_id}/{event_id}", put(send_leave))
        .route("/_matrix/federation/v1/send_join/{room_id}/{event_id}", put(send_join_v1))
        .route("/_matrix/federation/v1/send_leave/{room_id}/{event_id}", put(send_leave_v1))
        .route("/_matrix/federation/v1/invite/{room_id}/{event_id}", put(invite_v1))
        .route("/_matrix/federation/v1/make_knock/{room_id}/{user_id}", get(make_knock))
        .route("/_matrix/federation/v1/send_knock/{room_id}/{event_id}", put(send_knock))
        .route("/_matrix/federation/v2/invite/{room_id}/{event_id}", put(invite))
        .route("/_matrix/federation/v1/event/{event_id}", get(event))
        .route("/_matrix/federation/v1/state_ids/{room_id}", get(state_ids))
        .route("/_matrix/federation/v1/state/{room_id}", get(state_full))
        .route("/_matrix/federation/v1/event_auth/{room_id}/{event_id}", get(event_auth))
        .route("/_matrix/federation/v1/get_missing_events/{room_id}", post(get_missing_events))
        .route("/_matrix/federation/v1/backfill/{room_id}", get(backfill))
        .route("/_matrix/federation/v1/timestamp_to_event/{room_id}", get(timestamp_to_event))
        .route("/_matrix/federation/v1/publicRooms", get(public_rooms).post(search_public_rooms))
        .route("/_matrix/federation/v1/user/keys/query", post(user_keys_query))
        .route("/_matrix/federation/v1/user/keys/claim", post(user_keys_claim))
        .route("/_matrix/federation/v1/user/devices/{user_id}", get(user_devices))
}

/// `GET /publicRooms` for another server: this server's directory, as local clients see it.
async fn public_rooms(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<super::directory::PublicRoomsParams>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    tracing::debug!(origin = %auth.origin, "public rooms listed for another server");
    let query =
        lattice_service::rooms::PublicRoomsQuery { limit: params.limit, since: params.since, ..Default::default() };
    Ok(super::directory::page_json(state.service.rooms().public_rooms(query).await?))
}

/// `POST /publicRooms` for another server: with a filter.
async fn search_public_rooms(State(state): State<AppState>, auth: ServerAuth) -> ApiResult<Json<Value>> {
    let body: super::directory::PublicRoomsBody =
        serde_json::from_slice(&auth.body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    tracing::debug!(origin = %auth.origin, "public rooms searched by another server");
    Ok(super::directory::page_json(state.service.rooms().public_rooms(body.into_query()?).await?))
}

/// `POST /user/keys/query`: this server's users' device and cross-signing keys.
async fn user_keys_query(State(state): State<AppState>, auth: ServerAuth) -> ApiResult<Json<Value>> {
    Ok(Json(state.service.federation().user_keys_query(&auth.origin, &auth.body).await?))
}

/// `POST /user/keys/claim`: one-time (else fallback) keys of this server's users' devices.
async fn user_keys_claim(State(state): State<AppState>, auth: ServerAuth) -> ApiResult<Json<Value>> {
    Ok(Json(state.service.federation().user_keys_claim(&auth.origin, &auth.body).await?))
}

/// `GET /user/devices/{userId}`: a local user's device list, for a server resyncing it.
async fn user_devices(
    State(state): State<AppState>,
    PathParams(user_id): PathParams<String>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let user_id = parse_user(&user_id)?;
    Ok(Json(state.service.federation().user_devices(&auth.origin, &user_id).await?))
}

fn federation(state: &AppState) -> ApiResult<&Arc<KeyCache>> {
    state.federation.as_ref().ok_or(ApiError::UnknownEndpoint)
}

/// A request whose `X-Matrix` authorization verified: the origin server. It reads the body to
/// check the signature over it (routes with bodies will take them from here when they exist).
/// Missing, malformed, misaddressed or wrongly signed → `401 M_UNAUTHORIZED`.
/// Past authentication, the origin's rate limit and concurrency bound apply (see
/// [`crate::origin_gate`]); the turn is held until the handler returns.
pub struct ServerAuth {
    pub origin: OwnedServerName,
    /// The request body, whose signature was checked with the rest.
    pub body: axum::body::Bytes,
    _turn: crate::origin_gate::OriginPermit,
}

impl FromRequest<AppState> for ServerAuth {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let keys = federation(state)?;
        let (mut parts, body) = request.into_parts();
        let address = ClientIp::from_request_parts(&mut parts, state).await?.rate_key();
        state.failed_auth_gate.check(&address)?;
        let limit = state.config.max_request_bytes;
        let body = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::TooLarge(limit))?;
        let target = parts.uri.path_and_query().map_or_else(|| parts.uri.path(), |p| p.as_str());
        let origin =
            match lattice_federation::authenticate_request(keys, &parts.method, target, &parts.headers, &body).await {
                Ok(origin) => origin,
                Err(error @ FederationError::Unauthorized(_)) => {
                    state.failed_auth_gate.record_failure(&address);
                    return Err(error.into());
                }
                Err(error) => return Err(error.into()),
            };
        tracing::debug!(%origin, "authenticated server request");
        // A server that reaches this one is up: end any back-off towards it.
        state.service.federation().heard_from(&origin);
        state.limits.federation_per_origin.check(origin.as_str())?;
        let turn = state.origin_gate.enter(&origin).await?;
        Ok(ServerAuth { origin, body, _turn: turn })
    }
}

async fn server_keys(State(state): State<AppState>) -> ApiResult<Json<CanonicalJsonValue>> {
    let keys = federation(&state)?;
    let now = keys.client().clock().now_ms();
    Ok(Json(CanonicalJsonValue::Object(keys.own_keys().key_document(now)?)))
}

#[derive(Deserialize)]
struct MinimumValidity {
    minimum_valid_until_ts: Option<u64>,
}

fn parse_server_name(name: &str) -> ApiResult<OwnedServerName> {
    OwnedServerName::try_from(name).map_err(|_| ApiError::InvalidParam(format!("invalid server name {name:?}")))
}

async fn query_one(
    State(state): State<AppState>,
    ip: ClientIp,
    PathParams(server_name): PathParams<String>,
    QueryParams(query): QueryParams<MinimumValidity>,
) -> ApiResult<Json<Value>> {
    let keys = federation(&state)?;
    state.limits.key_query_per_ip.check(&ip.rate_key())?;
    let server = parse_server_name(&server_name)?;
    let minimum = query.minimum_valid_until_ts.unwrap_or_else(|| keys.client().clock().now_ms());
    let documents: Vec<CanonicalJsonValue> =
        keys.notary_document(&server, minimum).await?.map(CanonicalJsonValue::Object).into_iter().collect();
    Ok(Json(json!({ "server_keys": documents })))
}

#[derive(Deserialize)]
struct KeyCriteria {
    minimum_valid_until_ts: Option<u64>,
}

#[derive(Deserialize)]
struct BatchQuery {
    server_keys: BTreeMap<String, BTreeMap<String, KeyCriteria>>,
}

async fn query_many(
    State(state): State<AppState>,
    ip: ClientIp,
    JsonBody(query): JsonBody<BatchQuery>,
) -> ApiResult<Json<Value>> {
    let keys = federation(&state)?.clone();
    state.limits.key_query_per_ip.check(&ip.rate_key())?;
    let limit = lattice_federation::key_cache::MAX_QUERY_SERVERS;
    if query.server_keys.len() > limit {
        return Err(ApiError::InvalidParam(format!("at most {limit} servers per key query")));
    }
    let now = keys.client().clock().now_ms();
    let mut requests = Vec::with_capacity(query.server_keys.len());
    for (name, criteria) in query.server_keys {
        let server = parse_server_name(&name)?;
        // Whole documents are returned, whatever key IDs were asked for (the spec allows it);
        // the strictest validity asked for applies.
        let minimum = criteria.values().filter_map(|c| c.minimum_valid_until_ts).max().unwrap_or(now);
        requests.push((server, minimum));
    }
    // Servers are fetched in parallel: one slow server must not hold up the others' answers.
    let mut tasks = tokio::task::JoinSet::new();
    for (server, minimum) in requests {
        let keys = keys.clone();
        tasks.spawn(async move { keys.notary_document(&server, minimum).await });
    }
    let mut documents = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let document = joined.map_err(|e| ApiError::Service(ServiceError::Internal(format!("key query task: {e}"))))?;
        if let Some(document) = document? {
            documents.push(CanonicalJsonValue::Object(document));
        }
    }
    Ok(Json(json!({ "server_keys": documents })))
}

async fn version(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    federation(&state)?;
    Ok(Json(json!({ "server": { "name": "Lattice", "version": env!("CARGO_PKG_VERSION") } })))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: String,
    field: Option<String>,
}

/// `GET /_matrix/federation/v1/query/profile`: a local user's public profile, as the client
/// API's `GET /profile/{userId}` shows it to anyone.
async fn query_profile(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ProfileQuery>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let user_id = parse_user(&query.user_id)?;
    if user_id.server_name() != state.service.server_name() {
        return Err(ApiError::InvalidParam(format!("{user_id} is not a user of this server")));
    }
    let field = match query.field.as_deref() {
        None => None,
        Some(field @ ("displayname" | "avatar_url")) => Some(field),
        Some(other) => return Err(ApiError::InvalidParam(format!("unknown profile field {other:?}"))),
    };
    tracing::debug!(origin = %auth.origin, %user_id, "profile query");
    let profile = state.service.accounts().profile(&user_id).await?;
    let mut body = Map::new();
    if let Some(name) = profile.displayname.filter(|_| field.is_none_or(|f| f == "displayname")) {
        body.insert("displayname".into(), json!(name));
    }
    if let Some(url) = profile.avatar_url.filter(|_| field.is_none_or(|f| f == "avatar_url")) {
        body.insert("avatar_url".into(), json!(url));
    }
    Ok(Json(Value::Object(body)))
}

impl From<FederationError> for ApiError {
    fn from(error: FederationError) -> Self {
        ApiError::Federation(error)
    }
}

fn parse_event_id(id: &str) -> ApiResult<OwnedEventId> {
    OwnedEventId::try_from(id).map_err(|_| ApiError::InvalidParam(format!("invalid event ID {id:?}")))
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => ApiError::NotJson(e.to_string()),
        _ => ApiError::BadJson(e.to_string()),
    })
}

/// `PUT /send/{txnId}`: the PDUs and EDUs another server pushes; each PDU gets its own result.
async fn send_transaction(
    State(state): State<AppState>,
    PathParams(txn_id): PathParams<String>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let body: lattice_service::federation::TransactionBody = json_body(&auth.body)?;
    let results = state.service.federation().receive_transaction(&auth.origin, &txn_id, body).await?;
    Ok(Json(json!({ "pdus": results })))
}

async fn make_join(
    state: State<AppState>,
    path: PathParams<(String, String)>,
    query: QueryParams<Vec<(String, String)>>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    make_with_versions("join", state, path, query, auth).await
}

/// `make_join` and `make_knock`: a template for a room version the asking server lists in `ver`.
async fn make_with_versions(
    membership: &str,
    State(state): State<AppState>,
    PathParams((room_id, user_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<Vec<(String, String)>>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, user_id) = (parse_room(&room_id)?, parse_user(&user_id)?);
    let versions: Vec<String> = query.into_iter().filter(|(key, _)| key == "ver").map(|(_, v)| v).collect();
    let template =
        state.service.federation().make_membership(&auth.origin, &room_id, &user_id, membership, &versions).await?;
    Ok(Json(template))
}

async fn make_leave(
    State(state): State<AppState>,
    PathParams((room_id, user_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, user_id) = (parse_room(&room_id)?, parse_user(&user_id)?);
    let template = state.service.federation().make_membership(&auth.origin, &room_id, &user_id, "leave", &[]).await?;
    Ok(Json(template))
}

async fn send_join(
    State(state): State<AppState>,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&event_id)?);
    let answer = state.service.federation().send_join(&auth.origin, &room_id, &event_id, &auth.body).await?;
    Ok(Json(answer))
}

async fn send_leave(
    State(state): State<AppState>,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&event_id)?);
    let answer = state.service.federation().send_leave(&auth.origin, &room_id, &event_id, &auth.body).await?;
    Ok(Json(answer))
}

/// The deprecated v1 `send_join`: the v2 answer, in v1's `[200, answer]` shape.
async fn send_join_v1(
    state: State<AppState>,
    path: PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let Json(answer) = send_join(state, path, auth).await?;
    Ok(Json(json!([200, answer])))
}

/// The deprecated v1 `send_leave`, answered as `[200, {}]`.
async fn send_leave_v1(
    state: State<AppState>,
    path: PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let Json(answer) = send_leave(state, path, auth).await?;
    Ok(Json(json!([200, answer])))
}

/// `PUT /v1/invite/{roomId}/{eventId}`: the invite of servers that predate v2. The body is the
/// event itself, with the room's description in `unsigned.invite_room_state`; the room's version
/// is 1 or 2, as the spec says to assume (their event formats are the same). Answered as
/// `[200, {"event": …}]`.
async fn invite_v1(
    State(state): State<AppState>,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&event_id)?);
    let mut event: Value = serde_json::from_slice(&auth.body)
        .map_err(|e| ApiError::from(ServiceError::BadJson(format!("not an event: {e}"))))?;
    let room_state = event
        .get_mut("unsigned")
        .and_then(|unsigned| unsigned.as_object_mut())
        .and_then(|unsigned| unsigned.remove("invite_room_state"))
        .unwrap_or_else(|| json!([]));
    let request = json!({ "room_version": "1", "event": event, "invite_room_state": room_state });
    let bytes = serde_json::to_vec(&request).map_err(|e| ApiError::from(ServiceError::Internal(e.to_string())))?;
    let answer = state.service.federation().receive_invite(&auth.origin, &room_id, &event_id, &bytes).await?;
    Ok(Json(json!([200, answer])))
}

/// `GET /make_knock/{roomId}/{userId}?ver=…`: a knock template, only when the knock would pass
/// this server's auth rules now (the room's join rule takes knocks; the user is not banned).
async fn make_knock(
    state: State<AppState>,
    path: PathParams<(String, String)>,
    query: QueryParams<Vec<(String, String)>>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    make_with_versions("knock", state, path, query, auth).await
}

/// `PUT /send_knock/{roomId}/{eventId}`: the knocking server's signed knock.
async fn send_knock(
    State(state): State<AppState>,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&event_id)?);
    let answer = state.service.federation().send_knock(&auth.origin, &room_id, &event_id, &auth.body).await?;
    Ok(Json(answer))
}

/// `PUT /invite/v2/{roomId}/{eventId}`: another server invites one of this server's users.
async fn invite(
    State(state): State<AppState>,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&event_id)?);
    let answer = state.service.federation().receive_invite(&auth.origin, &room_id, &event_id, &auth.body).await?;
    Ok(Json(answer))
}

async fn event(
    State(state): State<AppState>,
    PathParams(event_id): PathParams<String>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let event_id = parse_event_id(&event_id)?;
    Ok(Json(state.service.federation().event(&auth.origin, &event_id).await?))
}

#[derive(Deserialize)]
struct AtEvent {
    event_id: String,
}

async fn state_ids(
    State(state): State<AppState>,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<AtEvent>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&query.event_id)?);
    Ok(Json(state.service.federation().state_at(&auth.origin, &room_id, &event_id, false).await?))
}

async fn state_full(
    State(state): State<AppState>,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<AtEvent>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&query.event_id)?);
    Ok(Json(state.service.federation().state_at(&auth.origin, &room_id, &event_id, true).await?))
}

async fn event_auth(
    State(state): State<AppState>,
    PathParams((room_id, event_id)): PathParams<(String, String)>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let (room_id, event_id) = (parse_room(&room_id)?, parse_event_id(&event_id)?);
    Ok(Json(state.service.federation().event_auth(&auth.origin, &room_id, &event_id).await?))
}

#[derive(Deserialize)]
struct MissingEventsBody {
    #[serde(default)]
    earliest_events: Vec<OwnedEventId>,
    latest_events: Vec<OwnedEventId>,
    #[serde(default = "default_missing_limit")]
    limit: usize,
    #[serde(default)]
    min_depth: u64,
}

fn default_missing_limit() -> usize {
    10
}

async fn get_missing_events(
    State(state): State<AppState>,
    PathParams(room_id): PathParams<String>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let body: MissingEventsBody = json_body(&auth.body)?;
    let answer = state
        .service
        .federation()
        .missing_events(&auth.origin, &room_id, &body.earliest_events, &body.latest_events, body.limit, body.min_depth)
        .await?;
    Ok(Json(answer))
}

async fn backfill(
    State(state): State<AppState>,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<Vec<(String, String)>>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let mut from = Vec::new();
    let mut limit = None;
    for (key, value) in query {
        match key.as_str() {
            "v" => from.push(parse_event_id(&value)?),
            "limit" => {
                limit = Some(value.parse::<usize>().map_err(|_| ApiError::InvalidParam(format!("limit {value:?}")))?)
            }
            _ => {}
        }
    }
    let limit = limit.ok_or_else(|| ApiError::InvalidParam("limit is required".into()))?;
    if from.is_empty() {
        return Err(ApiError::InvalidParam("at least one `v` is required".into()));
    }
    Ok(Json(state.service.federation().backfill(&auth.origin, &room_id, &from, limit).await?))
}

#[derive(Deserialize)]
struct TimestampQuery {
    ts: u64,
    dir: String,
}

/// `GET /timestamp_to_event/{roomId}?ts=&dir=f|b`.
async fn timestamp_to_event(
    State(state): State<AppState>,
    PathParams(room_id): PathParams<String>,
    QueryParams(query): QueryParams<TimestampQuery>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let forward = match query.dir.as_str() {
        "f" => true,
        "b" => false,
        other => return Err(ApiError::InvalidParam(format!("dir must be f or b, not {other:?}"))),
    };
    let found = state.service.federation().timestamp_to_event(&auth.origin, &room_id, query.ts, forward).await?;
    Ok(Json(found))
}

#[derive(Deserialize)]
struct DirectoryQuery {
    room_alias: String,
}

async fn query_directory(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<DirectoryQuery>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let alias = ruma::OwnedRoomAliasId::try_from(query.room_alias.as_str())
        .map_err(|_| ApiError::InvalidParam(format!("invalid room alias {:?}", query.room_alias)))?;
    tracing::debug!(origin = %auth.origin, %alias, "directory query");
    Ok(Json(state.service.federation().query_directory(&alias).await?))
}
