//! Every route of the client API, and the answers for everything else.

mod account;
mod backup;
mod dehydrated;
mod delayed_events;
mod devices;
mod directory;
mod discovery;
mod federation;
mod history;
mod keys;
mod media;
mod membership;
mod presence;
mod profile;
mod push;
mod reports;
mod rooms;
mod search;
mod session;
mod spaces;
mod sync;
mod tags;
mod thirdparty;
mod user_data;
mod user_directory;
mod voip;

use std::any::Any;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

use crate::AppState;
use crate::error::ApiError;

/// An axum router that also keeps the path template of every route it holds, so the route table
/// can be listed ([`crate::route_paths`]) and the no-panic test can prove it reaches every route.
#[derive(Default)]
pub struct Routes {
    router: Router<AppState>,
    paths: Vec<&'static str>,
}

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `path`; a `/_matrix/client/v3/` or `/_matrix/media/v3/` endpoint that existed in
    /// r0 also answers under `r0` by the same handler (older clients such as Hydrogen still call
    /// r0).
    /// The route list keeps the v3 template only.
    pub fn route(mut self, path: &'static str, methods: MethodRouter<AppState>) -> Self {
        if let Some(legacy) = legacy_r0_path(path) {
            self.router = self.router.route(&legacy, methods.clone());
        }
        self.router = self.router.route(path, methods);
        self.paths.push(path);
        self
    }

    pub fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.paths.extend(other.paths);
        self
    }

    pub fn paths(&self) -> &[&'static str] {
        &self.paths
    }

    pub fn into_router(self) -> Router<AppState> {
        self.router
    }
}

/// Client endpoints this server serves under v3 that r0 (up to r0.6.1) did not have.
const NOT_IN_R0: &[&str] = &[
    "knock/{room_id_or_alias}",
    "refresh",
    "rooms/{room_id}/report",
    "users/{user_id}/report",
    "keys/device_signing/upload",
    "keys/signatures/upload",
    // Media: uploads to a reserved ID came in v1.7.
    "upload/{server_name}/{media_id}",
];

/// The r0 path of a v3 client or media endpoint that existed in r0.
pub fn legacy_r0_path(path: &str) -> Option<String> {
    let (api, endpoint) = ["client", "media"]
        .into_iter()
        .find_map(|api| Some((api, path.strip_prefix(&format!("/_matrix/{api}/v3/"))?)))?;
    (!NOT_IN_R0.contains(&endpoint)).then(|| format!("/_matrix/{api}/r0/{endpoint}"))
}

pub fn all() -> Routes {
    Routes::new()
        .merge(discovery::routes())
        .merge(account::routes())
        .merge(session::routes())
        .merge(devices::routes())
        .merge(directory::routes())
        .merge(profile::routes())
        .merge(presence::routes())
        .merge(delayed_events::routes())
        .merge(rooms::routes())
        .merge(membership::routes())
        .merge(sync::routes())
        .merge(user_data::routes())
        .merge(history::routes())
        .merge(reports::routes())
        .merge(tags::routes())
        .merge(push::routes())
        .merge(user_directory::routes())
        .merge(voip::routes())
        .merge(thirdparty::routes())
        .merge(keys::routes())
        .merge(backup::routes())
        .merge(dehydrated::routes())
        .merge(federation::routes())
        .merge(search::routes())
        .merge(spaces::routes())
        .merge(spaces::federation_routes())
        .merge(media::routes())
}

/// The routes of the federation listener: the server-server and key APIs only.
pub fn federation_only() -> Routes {
    federation::routes().merge(spaces::federation_routes()).merge(media::federation_routes())
}

pub async fn unknown_endpoint() -> ApiError {
    ApiError::UnknownEndpoint
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A panic is a bug; the client still gets a Matrix error and the server keeps running.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = detail, "request handler panicked");
    let body = serde_json::json!({ "errcode": "M_UNKNOWN", "error": "internal server error" });
    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::legacy_r0_path;

    #[test]
    fn r0_paths_are_the_v3_endpoints_that_existed_in_r0() {
        assert_eq!(legacy_r0_path("/_matrix/client/v3/login").as_deref(), Some("/_matrix/client/r0/login"));
        assert_eq!(legacy_r0_path("/_matrix/client/v3/refresh"), None, "refresh came in v1.3");
        assert_eq!(legacy_r0_path("/_matrix/client/v1/rooms/{room_id}/threads"), None);
        assert_eq!(legacy_r0_path("/_matrix/federation/v1/version"), None);
        assert_eq!(
            legacy_r0_path("/_matrix/media/v3/download/{server_name}/{media_id}").as_deref(),
            Some("/_matrix/media/r0/download/{server_name}/{media_id}")
        );
        assert_eq!(legacy_r0_path("/_matrix/media/v3/upload/{server_name}/{media_id}"), None);
        assert_eq!(legacy_r0_path("/_matrix/media/v1/create"), None);
    }
}
