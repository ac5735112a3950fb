//! Registration, passwords, deactivation and third-party identifiers.

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use lattice_service::{RegisterRequest, ServiceError};
use ruma::api::client::account::register::RegistrationKind;
use ruma::api::client::account::{
    ThirdPartyIdRemovalStatus, change_password, check_registration_token_validity, deactivate,
    get_username_availability, register,
};
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, ClientIp};
use crate::typed::{Ruma, RumaResponse};

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

fn ip_key(ip: &ClientIp) -> String {
    ip.rate_key()
}

/// The request is ruma's type; the answer stays hand-built, because ruma's leaves out the
/// deprecated `home_server` that Lattice still sends for older clients.
async fn register(
    State(state): State<AppState>,
    ip: ClientIp,
    Ruma(body): Ruma<register::v3::Request>,
) -> ApiResult<Json<Value>> {
    match body.kind {
        RegistrationKind::User => {}
        RegistrationKind::Guest => return Err(ServiceError::GuestAccessForbidden.into()),
        _ => return Err(ApiError::InvalidParam("kind must be 'user' or 'guest'".into())),
    }
    state.limits.registration_per_ip.check(&ip_key(&ip))?;
    let request = RegisterRequest {
        username: body.username,
        password: body.password,
        device_id: body.device_id.map(|device| device.to_string()),
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

async fn username_available(
    State(state): State<AppState>,
    ip: ClientIp,
    Ruma(request): Ruma<get_username_availability::v3::Request>,
) -> ApiResult<RumaResponse<get_username_availability::v3::Response>> {
    state.limits.registration_per_ip.check(&ip_key(&ip))?;
    // A name that is taken or invalid is an error, not `available: false`, as the spec asks.
    state.service.accounts().username_available(&request.username).await?;
    Ok(RumaResponse(get_username_availability::v3::Response::new(true)))
}

async fn registration_token_validity(
    State(state): State<AppState>,
    ip: ClientIp,
    Ruma(request): Ruma<check_registration_token_validity::v1::Request>,
) -> ApiResult<RumaResponse<check_registration_token_validity::v1::Response>> {
    state.limits.registration_per_ip.check(&ip_key(&ip))?;
    if state.service.config().registration == lattice_service::RegistrationMode::Disabled {
        return Err(ServiceError::RegistrationDisabled.into());
    }
    let valid = state.service.accounts().registration_token_usable(&request.token).await?;
    Ok(RumaResponse(check_registration_token_validity::v1::Response::new(valid)))
}

async fn change_password(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    Ruma(request): Ruma<change_password::v3::Request>,
) -> ApiResult<RumaResponse<change_password::v3::Response>> {
    let auth = request.auth.as_ref();
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, auth)?;
    let (user, device) = (&session.user_id, session.device_id.as_str());
    state.service.change_password(user, device, request.new_password, request.logout_devices, auth).await?;
    Ok(RumaResponse(change_password::v3::Response::new()))
}

async fn deactivate(
    State(state): State<AppState>,
    Auth(session): Auth,
    ip: ClientIp,
    Ruma(request): Ruma<deactivate::v3::Request>,
) -> ApiResult<RumaResponse<deactivate::v3::Response>> {
    state.limits.check_password_stage(&ip.rate_key(), &session.user_id, request.auth.as_ref())?;
    state.service.deactivate(&session.user_id, request.auth.as_ref()).await?;
    // Lattice never binds identifiers at an identity server, so there is nothing to unbind.
    Ok(RumaResponse(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport)))
}

/// Lattice has no third-party identifiers: the list is honestly empty.
/// Not ruma's type: its response leaves an empty list out, and the answer names the empty list.
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
