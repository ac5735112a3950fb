//! What a client asks before it logs in: versions, capabilities, .well-known.

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use ruma::api::client::discovery::{discover_homeserver, get_supported_versions};
use serde_json::{Value, json};

use super::Routes;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::Auth;
use crate::typed::{Ruma, RumaResponse};

/// The spec versions whose client-server API Lattice targets. What is built so far is listed in
/// `docs/client-api.md`; unbuilt endpoints answer `404 M_UNRECOGNIZED`.
const SPEC_VERSIONS: &[&str] = &[
    "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12", "v1.13",
    "v1.14", "v1.15", "v1.16",
];

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/client/versions", get(versions))
        .route("/_matrix/client/v3/capabilities", get(capabilities))
        .route("/.well-known/matrix/client", get(well_known_client))
        .route("/.well-known/matrix/server", get(well_known_server))
}

async fn versions(
    State(state): State<AppState>,
    Ruma(_): Ruma<get_supported_versions::Request>,
) -> ApiResult<RumaResponse<get_supported_versions::Response>> {
    let mut response = get_supported_versions::Response::new(SPEC_VERSIONS.iter().map(|v| v.to_string()).collect());
    // MSC2815: server admins may read redacted content (clients look for this flag).
    response.unstable_features.insert("fi.mau.msc2815".into(), true);
    // MSC4140: delayed events, when the operator has them on.
    if state.service.delayed_events().config().enabled {
        response.unstable_features.insert("org.matrix.msc4140".into(), true);
    }
    // MSC3814: dehydrated devices (`/unstable/org.matrix.msc3814.v1/dehydrated_device`).
    response.unstable_features.insert("org.matrix.msc3814".into(), true);
    Ok(RumaResponse(response))
}

async fn capabilities(State(state): State<AppState>, _auth: Auth) -> Json<Value> {
    let available: serde_json::Map<String, Value> = lattice_core::room_version::SUPPORTED_ROOM_VERSIONS
        .iter()
        .map(|version| (version.to_string(), json!("stable")))
        .collect();
    Json(json!({
        "capabilities": {
            "m.room_versions": { "default": state.service.config().default_room_version, "available": available },
            "m.change_password": { "enabled": true },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false },
            "m.profile_fields": { "enabled": true, "allowed": ["displayname", "avatar_url"] },
        }
    }))
}

async fn well_known_client(
    State(state): State<AppState>,
    Ruma(_): Ruma<discover_homeserver::Request>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let Some(url) = &state.config.client_base_url else {
        return Err(ApiError::Service(lattice_service::ServiceError::NotFound(
            "no client discovery configured".into(),
        )));
    };
    match &state.config.livekit_service_url {
        // ruma 0.17 carries `rtc_foci` only behind an unstable feature this build does not
        // enable, so this answer is written out: MSC4143's key and its LiveKit focus.
        Some(livekit) => Ok(Json(json!({
            "m.homeserver": { "base_url": url },
            "org.matrix.msc4143.rtc_foci": [{ "type": "livekit", "livekit_service_url": livekit }],
        }))
        .into_response()),
        None => Ok(RumaResponse(discover_homeserver::Response::new(discover_homeserver::HomeserverInfo::new(
            url.to_string(),
        )))
        .into_response()),
    }
}

async fn well_known_server(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    match &state.config.well_known_server {
        Some(server) => Ok(Json(json!({ "m.server": server }))),
        None => {
            Err(ApiError::Service(lattice_service::ServiceError::NotFound("no server delegation configured".into())))
        }
    }
}
