//! The federation crate's one error type. `lattice-api` maps it to Matrix errors.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FederationError {
    /// A server name or delegated name that does not follow the grammar.
    #[error("invalid server name {0:?}")]
    InvalidServerName(String),
    /// Discovery found no address to connect to.
    #[error("could not resolve {server}: {detail}")]
    Resolve { server: String, detail: String },
    /// The destination failed recently and is not tried again before its back-off ends.
    #[error("{server} is backing off after failures; next try in {retry_in_ms} ms")]
    BackingOff { server: String, retry_in_ms: u64 },
    /// Connecting, TLS, a timeout, or a broken response.
    #[error("request to {server} failed: {detail}")]
    Transport { server: String, detail: String },
    /// The remote answered with an error status.
    #[error("{server} answered {status}: {body}")]
    Status { server: String, status: u16, body: String },
    /// The remote's answer is not what the spec says it must be (bad JSON, wrong fields,
    /// failed signatures, too large).
    #[error("invalid response from {server}: {detail}")]
    InvalidResponse { server: String, detail: String },
    /// An inbound request's `X-Matrix` authorization is missing or does not verify.
    #[error("{0}")]
    Unauthorized(String),
    /// The server is on this server's deny-list (`[federation] deny_servers`).
    #[error("{0} is denied by this server's federation.deny_servers")]
    Denied(String),
    /// The outbound address policy refuses every address of this host (or this IP literal).
    #[error("{0}: IP address blocked by this server's outbound address policy")]
    AddressDenied(String),
    /// A streamed request was answered with a redirect (307/308) to another location, which
    /// the caller may fetch as a plain URL (a media server's CDN).
    #[error("{server} redirected to {location}")]
    Redirect { server: String, location: String },
    /// A fetch of a URL took longer than allowed.
    #[error("fetching from {0} timed out")]
    TimedOut(String),
    /// A URL given to fetch is not an absolute http(s) URL with a host.
    #[error("{0}")]
    InvalidUrl(String),
    /// An argument this server controls was out of range (a bug or a misconfiguration).
    #[error("{0}")]
    Invalid(String),
    #[error("storage: {0}")]
    Storage(#[from] lattice_storage::StorageError),
}

pub type Result<T, E = FederationError> = std::result::Result<T, E>;
