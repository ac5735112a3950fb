//! Registration, passwords, deactivation and third-party identifiers.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::{RegisterRequest, ServiceError};
use ruma::api::client::uiaa::AuthData;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, ClientIp, JsonBody, QueryParams};

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/v3/register", post(register))
        .route("/_matrix/client/v3/register/available", get(username_available))
        .route("/_matrix/client/v1/register/m.login.registration_token/validity", get(registration_token_validity))
        .route("/_matrix/client/v3/account/password", post(change_password))
        .route("/_matrix/client/v3/account/deactivate", post(deactivate))
        .route("/_matrix/client/v3/account/3pid", get(threepids))
        .route("/_matrix/client/v3/account/3pid/add", post(threepid_denied_authed))
        .route("/_matrix/client/v3/account/3pid/bind", post(threepid_denied_authed))
        .route("/_matrix/client/v3/account/3pid/email/requestToken", post(threepid_denied))
        .route("/_matrix/client/v3/account/3pid/msisdn/requestToken", post(threepid_denied))
        .route("/_matrix/client/v3/register/email/requestToken", post(threepid_denied))
        .route("/_matrix/client/v3/register/msisdn/requestToken", post(threepid_denied))
        .route("/_matrix/client/v3/account/password/email/requestToken", post(threepid_not_found))
        .route("/_matrix/client/v3/account/password/msisdn/requestToken", post(threepid_not_found))
}

#[derive(Deserialize)]
struct RegisterQuery {
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
    auth: Option<AuthData>,
}

fn ip_key(ip: &ClientIp) -> String {
    ip.rate_key()
}

async fn register(
    State(state): State<AppState>,
    ip: ClientIp,
    QueryParams(query): QueryParams<RegisterQuery>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Json<Value>> {
    if query.kind.as_deref() == Some("guest") {
        return Err(ServiceError::GuestAccessForbidden.into());
    }
    if query.kind.as_deref().is_some_and(|kind| kind != "user") {
        return Err(ApiError::InvalidParam("kind must be 'user' or 'guest'".into()));
    }
    state.limits.registration_per_ip.check(&ip_key(&ip))?;
    let request = RegisterRequest {
        username: body.username,
        password: body.password,
        device_id: body.device_id,
        initial_device_display_name: body.initial_device_display_name,
        inhibit_login: body.inhibit_login,
        refresh_token: body.refresh_token,
        auth: body.auth,
        ip: ip.0.map(|ip| ip.to_string()),
    };
    let registered = state.service.accounts().register(request).await?;
    let mut response = json!({
        "user_id": registered.user_id,
        "home_server": state.service.server_name(),
    });
    if let Some(tokens) = registered.tokens {
        super::session::add_tokens(&mut response, tokens);
    }
    Ok(Json(response))
}

#[derive(Deserialize)]
struct UsernameQuery {
    username: String,
}

async fn username_available(
    State(state): State<AppState>,
    ip: ClientIp,
    QueryParams(query): QueryParams<UsernameQuery>,
) -> ApiResult<Json<Value>> {
    state.limits.registration_per_ip.check(&ip_key(&ip))?;
    state.service.accounts().username_available(&query.username).await?;
    Ok(Json(json!({ "available": true })))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: String,
}

async fn registration_token_validity(
    State(state): State<AppState>,
    ip: ClientIp,
    QueryParams(query): QueryParams<TokenQuery>,
) -> ApiResult<Json<Value>> {
    state.limits.registration_per_ip.check(&ip_key(&ip))?;
    if state.service.config().registration == lattice_service::RegistrationMode::Disabled {
        return Err(ServiceError::RegistrationDisabled.into());
    }
    let valid = state.service.accounts().registration_token_usable(&query.token).await?;
    Ok(Json(json!({ "valid": valid })))
}

#[derive(Deserialize)]
struct ChangePasswordBody {
    new_password: String,
    #[serde(default = "default_true")]
    logout_devices: bool,
    auth: Option<AuthData>,
}

fn default_true() -> bool {
    true
}

async fn change_password(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    JsonBody(body): JsonBody<ChangePasswordBody>,
) -> ApiResult<Json<Value>> {
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, body.auth.as_ref())?;
    state
        .service
        .change_password(
            &session.user_id,
            session.device_id.as_str(),
            body.new_password,
            body.logout_devices,
            body.auth.as_ref(),
        )
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeactivateBody {
    auth: Option<AuthData>,
}

async fn deactivate(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    JsonBody(body): JsonBody<DeactivateBody>,
) -> ApiResult<Json<Value>> {
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, body.auth.as_ref())?;
    state.service.deactivate(&session.user_id, body.auth.as_ref()).await?;
    // Lattice never binds identifiers at an identity server, so there is nothing to unbind.
    Ok(Json(json!({ "id_server_unbind_result": "no-support" })))
}

/// Lattice has no third-party identifiers: the list is honestly empty.
async fn threepids(_auth: Auth) -> Json<Value> {
    Json(json!({ "threepids": [] }))
}

async fn threepid_denied_authed(_auth: Auth) -> ApiError {
    ServiceError::ThreepidDenied.into()
}

async fn threepid_denied() -> ApiError {
    ServiceError::ThreepidDenied.into()
}

async fn threepid_not_found() -> ApiError {
    ApiError::ThreepidNotFound
}
