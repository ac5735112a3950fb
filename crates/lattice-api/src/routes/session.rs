//! Logging in and out, refresh tokens, whoami.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::{LoginRequest, SessionTokens};
use ruma::api::client::account::whoami;
use ruma::api::client::session::login::v3::LoginInfo;
use ruma::api::client::session::{get_login_types, logout, logout_all, refresh_token};
use ruma::api::client::uiaa::UserIdentifier;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, ClientIp, JsonBody};
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/login", get(login_flows).post(login))
        .route("/_matrix/client/v3/logout", post(logout))
        .route("/_matrix/client/v3/logout/all", post(logout_all))
        .route("/_matrix/client/v3/refresh", post(refresh))
        .route("/_matrix/client/v3/account/whoami", get(whoami))
}

async fn login_flows(
    Ruma(_): Ruma<get_login_types::v3::Request>,
) -> ApiResult<RumaResponse<get_login_types::v3::Response>> {
    let password = get_login_types::v3::LoginType::Password(Default::default());
    Ok(RumaResponse(get_login_types::v3::Response::new(vec![password])))
}

#[derive(Deserialize)]
struct LoginBody {
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

/// The user named by a password login: `identifier` of type `m.id.user`, or the legacy `user`.
// The spec still lets clients send the deprecated `user` field, and some do.
#[allow(deprecated)]
fn login_user(info: LoginInfo) -> ApiResult<(String, String)> {
    let LoginInfo::Password(password) = info else {
        return Err(ApiError::Unsupported("unsupported login type; this server offers m.login.password".into()));
    };
    let user = match (password.identifier, password.user) {
        (Some(UserIdentifier::Matrix(id)), _) => id.user,
        (Some(_), _) => return Err(ApiError::Unsupported("only m.id.user identifiers are supported".into())),
        (None, Some(user)) => user,
        (None, None) => return Err(ApiError::BadJson("missing identifier".into())),
    };
    Ok((user, password.password))
}

async fn login(State(state): State<AppState>, ip: ClientIp, JsonBody(body): JsonBody<Value>) -> ApiResult<Json<Value>> {
    state.limits.login_per_ip.check(&ip.rate_key())?;
    let ip = ip.0.map(|ip| ip.to_string());
    // ruma 0.17's LoginInfo deserializer panics on an object without `type` (it indexes the
    // map directly), so that case is answered here first.
    if !body["type"].is_string() {
        return Err(ApiError::BadJson("missing field `type`".into()));
    }
    let info: LoginInfo = serde_json::from_value(body.clone()).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let options: LoginBody = serde_json::from_value(body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let (user, password) = login_user(info)?;
    state.limits.login_per_user.check(&user.to_lowercase())?;
    let request = LoginRequest {
        user,
        password,
        device_id: options.device_id,
        initial_device_display_name: options.initial_device_display_name,
        refresh_token: options.refresh_token,
        ip,
    };
    let result = state.service.accounts().login(request).await?;
    let mut response = json!({ "user_id": result.user_id, "home_server": state.service.server_name() });
    if let Some(url) = &state.config.client_base_url {
        response["well_known"] = json!({ "m.homeserver": { "base_url": url } });
    }
    add_tokens(&mut response, result.tokens);
    Ok(Json(response))
}

/// Adds a device's session to a login or registration response.
pub(super) fn add_tokens(response: &mut Value, tokens: SessionTokens) {
    response["access_token"] = json!(tokens.access_token);
    response["device_id"] = json!(tokens.device_id);
    if let Some(refresh_token) = tokens.refresh_token {
        response["refresh_token"] = json!(refresh_token);
    }
    if let Some(expires_in_ms) = tokens.expires_in_ms {
        response["expires_in_ms"] = json!(expires_in_ms);
    }
}

async fn logout(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<logout::v3::Request>,
) -> ApiResult<RumaResponse<logout::v3::Response>> {
    state.service.logout(&session).await?;
    Ok(RumaResponse(logout::v3::Response::new()))
}

async fn logout_all(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<logout_all::v3::Request>,
) -> ApiResult<RumaResponse<logout_all::v3::Response>> {
    state.service.logout_all(&session.user_id).await?;
    Ok(RumaResponse(logout_all::v3::Response::new()))
}

async fn refresh(
    State(state): State<AppState>,
    Ruma(request): Ruma<refresh_token::v3::Request>,
) -> ApiResult<RumaResponse<refresh_token::v3::Response>> {
    let tokens = state.service.accounts().refresh(&request.refresh_token).await?;
    let mut response = refresh_token::v3::Response::new(tokens.access_token);
    response.refresh_token = tokens.refresh_token;
    response.expires_in_ms = tokens.expires_in_ms.map(std::time::Duration::from_millis);
    Ok(RumaResponse(response))
}

async fn whoami(Auth(session): Auth, Ruma(_): Ruma<whoami::v3::Request>) -> RumaResponse<whoami::v3::Response> {
    let mut response = whoami::v3::Response::new(session.user_id, false);
    response.device_id = Some(session.device_id);
    RumaResponse(response)
}
