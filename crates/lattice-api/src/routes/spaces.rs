//! Space hierarchies: `GET /rooms/{roomId}/hierarchy` for clients and federation
//! `GET /hierarchy/{roomId}` for other servers (see `lattice_service::federation` for the walk).

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use lattice_service::federation::HierarchyQuery;
use serde::Deserialize;
use serde_json::Value;

use super::Routes;
use super::federation::ServerAuth;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::{Auth, PathParams, QueryParams, parse_room};

/// The client route.
pub fn routes() -> Routes {
    Routes::new().route("/_matrix/client/v1/rooms/{room_id}/hierarchy", get(hierarchy))
}

/// The server-server route (also on the federation listener).
pub fn federation_routes() -> Routes {
    Routes::new().route("/_matrix/federation/v1/hierarchy/{room_id}", get(federation_hierarchy))
}

#[derive(Deserialize)]
struct HierarchyParams {
    #[serde(default)]
    suggested_only: bool,
    max_depth: Option<u64>,
    limit: Option<u64>,
    from: Option<String>,
}

async fn hierarchy(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams(room_id): PathParams<String>,
    QueryParams(params): QueryParams<HierarchyParams>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let query = HierarchyQuery {
        suggested_only: params.suggested_only,
        max_depth: params.max_depth,
        limit: params.limit,
        from: params.from,
    };
    Ok(Json(state.service.federation().space_hierarchy(&session.user_id, &room_id, query).await?))
}

#[derive(Deserialize)]
struct FederationParams {
    #[serde(default)]
    suggested_only: bool,
}

async fn federation_hierarchy(
    State(state): State<AppState>,
    PathParams(room_id): PathParams<String>,
    QueryParams(params): QueryParams<FederationParams>,
    auth: ServerAuth,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let federation = state.service.federation();
    Ok(Json(federation.hierarchy_for_server(&auth.origin, &room_id, params.suggested_only).await?))
}
