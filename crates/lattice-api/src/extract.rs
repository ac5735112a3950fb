//! Request extractors: JSON bodies with Matrix errors, access tokens, client addresses.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use lattice_service::Session;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::{AppState, client_ip};

/// The whole request body, at most `limit` bytes (else `M_TOO_LARGE`).
pub(crate) async fn read_body(body: axum::body::Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_length_limit(&e) { ApiError::TooLarge(limit) } else { ApiError::BadJson(format!("reading body: {e}")) }
    })
}

/// A JSON request body parsed into `T`. Not JSON at all → `M_NOT_JSON`; JSON of the wrong
/// shape → `M_BAD_JSON`; over the configured size → `M_TOO_LARGE`. An empty body reads as `{}`
/// so endpoints whose fields are all optional accept a bodiless request.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(request.into_body(), state.config.max_request_bytes).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ApiError::NotJson(format!("body is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::BadJson("body must be a JSON object".into()));
        }
        serde_json::from_value(value).map(JsonBody).map_err(|e| ApiError::BadJson(e.to_string()))
    }
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The access token of a request: `Authorization: Bearer` or the legacy `access_token` query
/// parameter.
fn access_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(AUTHORIZATION) {
        return value.to_str().ok()?.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    url_query_pairs(query).find(|(k, _)| k == "access_token").map(|(_, v)| v)
}

fn url_query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default().into_iter()
}

/// An authenticated caller. Rejects with `M_MISSING_TOKEN` or `M_UNKNOWN_TOKEN`.
pub struct Auth(pub Session);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = access_token(parts).ok_or(ApiError::MissingToken)?;
        Ok(Auth(state.service.accounts().authenticate(&token).await?))
    }
}

/// The client's address: the peer, or with `trust_x_forwarded_for`, the right-most
/// `X-Forwarded-For` hop not added by a trusted proxy (see [`crate::client_ip`]).
pub struct ClientIp(pub Option<IpAddr>);

impl ClientIp {
    /// The rate-limit bucket of this client (IPv6 per /64); empty when the peer is unknown.
    pub fn rate_key(&self) -> String {
        self.0.map(client_ip::rate_limit_key).unwrap_or_default()
    }
}

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(peer) = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()) else {
            return Ok(ClientIp(None));
        };
        if !state.config.trust_x_forwarded_for {
            return Ok(ClientIp(Some(peer.to_canonical())));
        }
        // Several X-Forwarded-For headers are one list, in order.
        let hops: Vec<&str> = parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        let header = (!hops.is_empty()).then(|| hops.join(","));
        Ok(ClientIp(Some(client_ip::client_address(peer, header.as_deref(), &state.config.trusted_proxies))))
    }
}

/// Query parameters parsed into `T`; a missing or malformed one is `M_INVALID_PARAM`.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query).map(QueryParams).map_err(|e| ApiError::InvalidParam(format!("query: {e}")))
    }
}

/// Path parameters parsed into `T`; undecodable ones (e.g. `%FF`) are `M_INVALID_PARAM`.
pub struct PathParams<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(ApiError::InvalidParam(rejection.body_text())),
        }
    }
}

/// A user ID from a path; a malformed one is `M_INVALID_PARAM`.
pub fn parse_user(user_id: &str) -> Result<ruma::OwnedUserId, ApiError> {
    ruma::OwnedUserId::try_from(user_id).map_err(|e| ApiError::InvalidParam(format!("invalid user ID: {e}")))
}

/// A room ID from a path; a malformed one is `M_INVALID_PARAM`.
pub fn parse_room(room_id: &str) -> Result<ruma::OwnedRoomId, ApiError> {
    ruma::OwnedRoomId::try_from(room_id).map_err(|e| ApiError::InvalidParam(format!("invalid room ID: {e}")))
}
