//! `/presence/{userId}/status` (spec client-server "Presence"), on ruma's types.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use lattice_service::presence::PresenceState;
use ruma::api::client::presence::{get_presence, set_presence};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new().route("/_matrix/client/v3/presence/{user_id}/status", get(get_status).put(set_status))
}

async fn get_status(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<get_presence::v3::Request>,
) -> ApiResult<RumaResponse<get_presence::v3::Response>> {
    let presence = state.service.get_presence(&session.user_id, &request.user_id).await?;
    let now = state.service.presence().now_ms();
    let mut response = get_presence::v3::Response::new(presence.state.as_str().into());
    response.status_msg = presence.status_msg.clone();
    response.currently_active = Some(presence.currently_active());
    if presence.last_active_ts > 0 {
        response.last_active_ago = Some(Duration::from_millis(now.saturating_sub(presence.last_active_ts)));
    }
    Ok(RumaResponse(response))
}

async fn set_status(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(request): Ruma<set_presence::v3::Request>,
) -> ApiResult<RumaResponse<set_presence::v3::Response>> {
    // ruma keeps values outside the spec's three as custom ones; the spec allows only those.
    let Some(presence) = PresenceState::parse(request.presence.as_str()) else {
        let refused = request.presence.as_str();
        return Err(ApiError::InvalidParam(format!(
            "presence must be online, unavailable or offline, not {refused:?}"
        )));
    };
    state.service.set_presence(&session.user_id, &request.user_id, presence, request.status_msg).await?;
    Ok(RumaResponse(set_presence::v3::Response::new()))
}
