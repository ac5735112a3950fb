//! The HTTP edge of Lattice: routes, request parsing, authentication, rate limits, CORS, and
//! the mapping from service errors to Matrix errors.

mod client_ip;
mod error;
mod extract;
mod origin_gate;
mod rate_limit;
mod routes;
mod typed;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, Method, header};
use lattice_federation::KeyCache;
use lattice_service::Service;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{Any, CorsLayer};
use tower_http::trace::TraceLayer;

pub use client_ip::IpNetwork;
pub use error::ApiError;
use origin_gate::{FailedAuthGate, OriginGate};
pub use rate_limit::{KeyedLimiter, RateLimit, RateLimits};

/// What the HTTP edge needs to know beyond the service.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Bodies above this are refused with `M_TOO_LARGE`.
    pub max_request_bytes: usize,
    /// Served at `/.well-known/matrix/client` as `m.homeserver.base_url`, when set.
    pub client_base_url: Option<String>,
    /// Announced at `/.well-known/matrix/client` as the LiveKit focus of
    /// `org.matrix.msc4143.rtc_foci`, when set (with `client_base_url`).
    pub livekit_service_url: Option<String>,
    /// Served at `/.well-known/matrix/server` as `m.server`, when set.
    pub well_known_server: Option<String>,
    pub trust_x_forwarded_for: bool,
    /// Peers whose `X-Forwarded-For` hops are believed (with `trust_x_forwarded_for`).
    pub trusted_proxies: Vec<IpNetwork>,
    pub login_per_ip: Option<RateLimit>,
    pub login_per_user: Option<RateLimit>,
    pub registration_per_ip: Option<RateLimit>,
    /// `m.login.password` stages of user-interactive auth.
    pub uia_password_per_ip: Option<RateLimit>,
    pub uia_password_per_user: Option<RateLimit>,
    /// The unauthenticated `GET /publicRooms`, and its authenticated `POST` search.
    pub public_rooms_per_ip: Option<RateLimit>,
    /// Events sent by clients: messages, state events, redactions.
    pub message_per_user: Option<RateLimit>,
    pub room_creation_per_user: Option<RateLimit>,
    pub invite_per_user: Option<RateLimit>,
    /// Joins and knocks.
    pub join_per_user: Option<RateLimit>,
    pub to_device_per_user: Option<RateLimit>,
    /// Authenticated server-server requests of one origin server.
    pub federation_per_origin: Option<RateLimit>,
    /// Server-server requests that failed authentication, per client address; past the limit
    /// the address is refused until the limit lets it in again.
    pub federation_failed_auth_per_ip: Option<RateLimit>,
    /// The notary API (`/_matrix/key/v2/query`), per client address.
    pub key_query_per_ip: Option<RateLimit>,
    /// Server-server requests of one origin handled at once; more wait.
    pub federation_concurrent_per_origin: usize,
    /// Server-server requests of one origin that may wait; more get `429`.
    pub federation_queued_per_origin: usize,
    pub url_preview_per_user: Option<RateLimit>,
    /// Delayed-event management, per `delay_id` (updates) or user (listings).
    pub delayed_events_per_key: Option<RateLimit>,
}

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub config: Arc<ApiConfig>,
    pub limits: Arc<RateLimits>,
    /// Federation (keys, notary, X-Matrix checks); `None` when `[federation] listen` is unset,
    /// and then every server-server route answers `404 M_UNRECOGNIZED`.
    pub federation: Option<Arc<KeyCache>>,
    /// Per-origin concurrency of inbound federation.
    pub origin_gate: Arc<OriginGate>,
    /// Addresses refused after failed server-server authentications.
    pub failed_auth_gate: Arc<FailedAuthGate>,
}

impl AppState {
    pub fn new(service: Arc<Service>, config: ApiConfig) -> Self {
        let limits = RateLimits {
            login_per_ip: KeyedLimiter::new(config.login_per_ip),
            login_per_user: KeyedLimiter::new(config.login_per_user),
            registration_per_ip: KeyedLimiter::new(config.registration_per_ip),
            uia_password_per_ip: KeyedLimiter::new(config.uia_password_per_ip),
            uia_password_per_user: KeyedLimiter::new(config.uia_password_per_user),
            public_rooms_per_ip: KeyedLimiter::new(config.public_rooms_per_ip),
            message_per_user: KeyedLimiter::new(config.message_per_user),
            room_creation_per_user: KeyedLimiter::new(config.room_creation_per_user),
            invite_per_user: KeyedLimiter::new(config.invite_per_user),
            join_per_user: KeyedLimiter::new(config.join_per_user),
            to_device_per_user: KeyedLimiter::new(config.to_device_per_user),
            federation_per_origin: KeyedLimiter::new(config.federation_per_origin),
            key_query_per_ip: KeyedLimiter::new(config.key_query_per_ip),
            url_preview_per_user: KeyedLimiter::new(config.url_preview_per_user),
            delayed_events_per_key: KeyedLimiter::new(config.delayed_events_per_key),
        };
        let origin_gate = OriginGate::new(config.federation_concurrent_per_origin, config.federation_queued_per_origin);
        let failed_auth_gate = FailedAuthGate::new(config.federation_failed_auth_per_ip);
        Self {
            service,
            config: Arc::new(config),
            limits: Arc::new(limits),
            federation: None,
            origin_gate: Arc::new(origin_gate),
            failed_auth_gate: Arc::new(failed_auth_gate),
        }
    }

    /// Turns on the server-server routes, served by `keys`.
    pub fn with_federation(mut self, keys: Arc<KeyCache>) -> Self {
        self.federation = Some(keys);
        self
    }
}

/// The path template of every route the application serves (e.g.
/// `/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}`), in registration order.
pub fn route_paths() -> Vec<&'static str> {
    routes::all().paths().to_vec()
}

/// The whole HTTP application: the client API, and the server-server routes (answering only
/// when federation is on, so a reverse proxy may send both to this listener).
pub fn router(state: AppState) -> Router {
    finish(routes::all(), state)
}

/// The application of the TLS federation listener: the server-server and key routes only;
/// everything else is `404 M_UNRECOGNIZED`.
pub fn federation_router(state: AppState) -> Router {
    finish(routes::federation_only(), state)
}

fn finish(routes: routes::Routes, state: AppState) -> Router {
    // The spec's CORS requirements (client-server API, "Web Browser Clients").
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([HeaderName::from_static("x-requested-with"), header::CONTENT_TYPE, header::AUTHORIZATION]);
    routes
        .into_router()
        .fallback(routes::unknown_endpoint)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state)
        .layer(CatchPanicLayer::custom(routes::panic_response))
        // Spans carry the path only: the query may hold a legacy `access_token`.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::extract::Request| {
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        .layer(cors)
}
