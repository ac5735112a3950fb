//! `GET /voip/turnServer`: TURN credentials for calls.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ruma::api::client::voip::get_turn_server_info;
use serde_json::json;

use super::Routes;
use crate::AppState;
use crate::error::ApiResult;
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

pub fn routes() -> Routes {
    Routes::new().route("/_matrix/client/v3/voip/turnServer", get(turn_server))
}

async fn turn_server(
    State(state): State<AppState>,
    Auth(session): Auth,
    Ruma(_): Ruma<get_turn_server_info::v3::Request>,
) -> ApiResult<Response> {
    match state.service.turn_server(&session.user_id) {
        Some(turn) => Ok(RumaResponse(get_turn_server_info::v3::Response::new(
            turn.username,
            turn.password,
            turn.uris,
            std::time::Duration::from_secs(turn.ttl_secs),
        ))
        .into_response()),
        // The spec defines only the configured answer; without a TURN server this is Synapse's
        // answer, an empty object, which clients (matrix-js-sdk, Element) read as "no TURN
        // server" and call without one, rather than retrying an error.
        None => Ok(Json(json!({})).into_response()),
    }
}
