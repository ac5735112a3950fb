//! Every route of the client API, and the answers for everything else.

mod account;
mod devices;
mod directory;
mod discovery;
mod federation;
mod history;
mod membership;
mod profile;
mod push;
mod reports;
mod rooms;
mod session;
mod sync;
mod tags;
mod user_data;

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

    pub fn route(mut self, path: &'static str, methods: MethodRouter<AppState>) -> Self {
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

pub fn all() -> Routes {
    Routes::new()
        .merge(discovery::routes())
        .merge(account::routes())
        .merge(session::routes())
        .merge(devices::routes())
        .merge(directory::routes())
        .merge(profile::routes())
        .merge(rooms::routes())
        .merge(membership::routes())
        .merge(sync::routes())
        .merge(user_data::routes())
        .merge(history::routes())
        .merge(reports::routes())
        .merge(tags::routes())
        .merge(push::routes())
        .merge(federation::routes())
}

/// The routes of the federation listener: the server-server and key APIs only.
pub fn federation_only() -> Routes {
    federation::routes()
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
