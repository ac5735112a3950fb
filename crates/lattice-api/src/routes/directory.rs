//! Room aliases and the public room directory.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, put};
use lattice_service::ServiceError;
use lattice_service::rooms::{PublicRoomsPage, PublicRoomsQuery};
use serde::Deserialize;
use serde_json::{Value, json};

use ruma::api::client::alias::{create_alias, delete_alias, get_alias};
use ruma::api::client::directory::get_room_visibility;
use ruma::api::client::room::{self, aliases};

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, ClientIp, JsonBody, PathParams, QueryParams, parse_room};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route(
            "/_matrix/client/v3/directory/room/{room_alias}",
            put(create_alias).get(resolve_alias).delete(delete_alias),
        )
        .route("/_matrix/client/v3/rooms/{room_id}/aliases", get(room_aliases))
        .route("/_matrix/client/v3/publicRooms", get(public_rooms).post(search_public_rooms))
        .route("/_matrix/client/v3/directory/list/room/{room_id}", get(visibility).put(set_visibility))
}

async fn create_alias(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<create_alias::v3::Request>,
) -> ApiResult<RumaResponse<create_alias::v3::Response>> {
    state.service.rooms().create_alias(&session.user_id, &request.room_alias, &request.room_id).await?;
    Ok(RumaResponse(create_alias::v3::Response::new()))
}

/// No access token needed: aliases are public names.
async fn resolve_alias(
    State(state): State<AppState>,
    Ruma(request): Ruma<get_alias::v3::Request>,
) -> ApiResult<RumaResponse<get_alias::v3::Response>> {
    let (room_id, servers) = state.service.resolve_alias(&request.room_alias).await?;
    Ok(RumaResponse(get_alias::v3::Response::new(room_id, servers)))
}

async fn delete_alias(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<delete_alias::v3::Request>,
) -> ApiResult<RumaResponse<delete_alias::v3::Response>> {
    state.service.rooms().delete_alias(&session.user_id, &request.room_alias).await?;
    Ok(RumaResponse(delete_alias::v3::Response::new()))
}

async fn room_aliases(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<aliases::v3::Request>,
) -> ApiResult<RumaResponse<aliases::v3::Response>> {
    let aliases = state.service.rooms().room_aliases(&session.user_id, &request.room_id).await?;
    Ok(RumaResponse(aliases::v3::Response::new(aliases)))
}

#[derive(Deserialize)]
pub(crate) struct PublicRoomsParams {
    pub(crate) limit: Option<usize>,
    pub(crate) since: Option<String>,
    server: Option<String>,
}

#[derive(Deserialize, Default)]
struct PublicRoomsFilter {
    generic_search_term: Option<String>,
    room_types: Option<Vec<Option<String>>>,
}

/// `include_all_networks` is read as absent: no application-service networks exist, so
/// including them all changes nothing.
#[derive(Deserialize)]
pub(crate) struct PublicRoomsBody {
    limit: Option<usize>,
    since: Option<String>,
    #[serde(default)]
    filter: PublicRoomsFilter,
    third_party_instance_id: Option<String>,
}

impl PublicRoomsBody {
    /// The query this body asks; third-party networks are not bridged here.
    pub(crate) fn into_query(self) -> ApiResult<PublicRoomsQuery> {
        if let Some(instance) = self.third_party_instance_id {
            return Err(ServiceError::NotFound(format!("no third-party network {instance:?} is bridged here")).into());
        }
        Ok(PublicRoomsQuery {
            limit: self.limit,
            since: self.since,
            generic_search_term: self.filter.generic_search_term,
            room_types: self.filter.room_types,
        })
    }
}

#[derive(Deserialize)]
struct ServerParam {
    server: Option<String>,
}

/// This server's directory, or the one of the server a client names (`?server=`), asked over
/// federation.
async fn listing(state: &AppState, server: Option<&str>, query: PublicRoomsQuery) -> ApiResult<PublicRoomsPage> {
    match server {
        Some(server) if server != state.service.server_name().as_str() => {
            let server = <&ruma::ServerName>::try_from(server)
                .map_err(|_| ServiceError::InvalidParam(format!("invalid server name {server:?}")))?;
            if !state.service.federation().is_enabled() {
                return Err(ServiceError::NotFound(format!(
                    "listing the public rooms of {server} needs federation, which is off on this server"
                ))
                .into());
            }
            Ok(state.service.federation().remote_public_rooms(server, &query).await?)
        }
        _ => Ok(state.service.rooms().public_rooms(query).await?),
    }
}

pub(crate) fn page_json(page: PublicRoomsPage) -> Json<Value> {
    let mut body = json!({ "chunk": page.chunk, "total_room_count_estimate": page.total_room_count_estimate });
    if let Some(next) = page.next_batch {
        body["next_batch"] = json!(next);
    }
    if let Some(prev) = page.prev_batch {
        body["prev_batch"] = json!(prev);
    }
    Json(body)
}

/// No access token needed (the spec leaves this listing open).
async fn public_rooms(
    State(state): State<AppState>,
    ip: ClientIp,
    QueryParams(params): QueryParams<PublicRoomsParams>,
) -> ApiResult<Json<Value>> {
    state.limits.public_rooms_per_ip.check(&ip.rate_key())?;
    let query = PublicRoomsQuery { limit: params.limit, since: params.since, ..Default::default() };
    Ok(page_json(listing(&state, params.server.as_deref(), query).await?))
}

async fn search_public_rooms(
    State(state): State<AppState>,
    Auth(_session): Auth,
    ip: ClientIp,
    QueryParams(params): QueryParams<ServerParam>,
    JsonBody(body): JsonBody<PublicRoomsBody>,
) -> ApiResult<Json<Value>> {
    state.limits.public_rooms_per_ip.check(&ip.rate_key())?;
    Ok(page_json(listing(&state, params.server.as_deref(), body.into_query()?).await?))
}

/// No access token needed.
async fn visibility(
    State(state): State<AppState>,
    Ruma(request): Ruma<get_room_visibility::v3::Request>,
) -> ApiResult<RumaResponse<get_room_visibility::v3::Response>> {
    let public = state.service.rooms().room_is_public(&request.room_id).await?;
    let visibility = if public { room::Visibility::Public } else { room::Visibility::Private };
    Ok(RumaResponse(get_room_visibility::v3::Response::new(visibility)))
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Visibility {
    /// The spec's default when the body names none.
    #[default]
    Public,
    Private,
}

#[derive(Deserialize)]
struct VisibilityBody {
    #[serde(default)]
    visibility: Visibility,
}

async fn set_visibility(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    JsonBody(body): JsonBody<VisibilityBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    state
        .service
        .rooms()
        .set_room_visibility(&session.user_id, &room_id, body.visibility == Visibility::Public)
        .await?;
    Ok(Json(json!({})))
}
