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
use axum::extract::{FromRequest, Request, State};
use axum::routing::{get, post};
use lattice_federation::{FederationError, KeyCache};
use lattice_service::ServiceError;
use ruma::{CanonicalJsonValue, OwnedServerName};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, PathParams, QueryParams, parse_user};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/query/{server_name}", get(query_one))
        .route("/_matrix/key/v2/query", post(query_many))
        .route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/federation/v1/query/profile", get(query_profile))
}

fn federation(state: &AppState) -> ApiResult<&Arc<KeyCache>> {
    state.federation.as_ref().ok_or(ApiError::UnknownEndpoint)
}

/// A request whose `X-Matrix` authorization verified: the origin server. It reads the body to
/// check the signature over it (routes with bodies will take them from here when they exist).
/// Missing, malformed, misaddressed or wrongly signed → `401 M_UNAUTHORIZED`.
pub struct ServerAuth {
    pub origin: OwnedServerName,
}

impl FromRequest<AppState> for ServerAuth {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let keys = federation(state)?;
        let (parts, body) = request.into_parts();
        let limit = state.config.max_request_bytes;
        let body = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::TooLarge(limit))?;
        let target = parts.uri.path_and_query().map_or_else(|| parts.uri.path(), |p| p.as_str());
        let origin =
            lattice_federation::authenticate_request(keys, &parts.method, target, &parts.headers, &body).await?;
        tracing::debug!(%origin, "authenticated server request");
        Ok(ServerAuth { origin })
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
    PathParams(server_name): PathParams<String>,
    QueryParams(query): QueryParams<MinimumValidity>,
) -> ApiResult<Json<Value>> {
    let keys = federation(&state)?;
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

async fn query_many(State(state): State<AppState>, JsonBody(query): JsonBody<BatchQuery>) -> ApiResult<Json<Value>> {
    let keys = federation(&state)?.clone();
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
