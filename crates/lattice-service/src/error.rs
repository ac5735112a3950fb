use lattice_storage::StorageError;
use thiserror::Error;

use crate::UiaChallenge;

/// Everything the application can refuse. The HTTP edge maps each variant to one Matrix
/// errcode and status, in one place.
#[derive(Debug, Error)]
pub enum ServiceError {
    #[error("{0}")]
    Forbidden(String),
    #[error("unknown or expired access token")]
    UnknownToken { soft_logout: bool },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    InvalidParam(String),
    /// A required part of a request is missing or unusable (`M_MISSING_PARAM`), e.g. an
    /// invite from another server without the room's create event.
    #[error("{0}")]
    MissingParam(String),
    /// A request the spec refuses with its generic `400 M_UNKNOWN` (e.g. forgetting a room the
    /// user is still in).
    #[error("{0}")]
    BadRequest(String),
    /// Data only the server may write (spec answers 405 `M_BAD_JSON`).
    #[error("{0}")]
    ServerManaged(String),
    /// An upload to a media ID that already has its bytes (spec: 409).
    #[error("this media has already been uploaded")]
    CannotOverwriteMedia,
    /// Media reserved with `create` whose bytes did not arrive in time (spec: 504).
    #[error("the media has not been uploaded yet")]
    NotYetUploaded,
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("{0}")]
    InvalidUsername(String),
    #[error("the user ID is already taken")]
    UserInUse,
    #[error("this account has been deactivated")]
    UserDeactivated,
    #[error("registration is disabled on this server")]
    RegistrationDisabled,
    #[error("guest access is not enabled on this server")]
    GuestAccessForbidden,
    #[error("this server does not support third-party identifiers")]
    ThreepidDenied,
    #[error("{0}")]
    LimitExceeded(String),
    /// A delayed event's delay above the configured maximum (MSC4140: 400
    /// `M_MAX_DELAY_EXCEEDED` with `max_delay`).
    #[error("the requested delay exceeds the allowed maximum of {max_delay_ms} ms")]
    MaxDelayExceeded { max_delay_ms: u64 },
    /// A user with as many delayed events scheduled as allowed (MSC4140: 429
    /// `M_LIMIT_EXCEEDED`, `Retry-After` until their next one falls due).
    #[error("the maximum number of scheduled delayed events has been reached")]
    TooManyDelayedEvents { retry_after_ms: u64 },
    /// A request that conflicts with the resource's state (409 `M_UNKNOWN`).
    #[error("{0}")]
    Conflict(String),
    /// `createRoom` asked for an alias that is taken (spec: 400 `M_ROOM_IN_USE`).
    #[error("{0}")]
    RoomInUse(String),
    /// `PUT /directory/room/{alias}` for an alias that exists (spec: 409).
    #[error("{0}")]
    AliasInUse(String),
    /// An `m.room.canonical_alias` naming an alias that is invalid or not this room's.
    #[error("{0}")]
    BadAlias(String),
    /// A write of backed-up keys to a backup version that is not the current one.
    #[error("the current backup version is {current_version}")]
    WrongRoomKeysVersion { current_version: String },
    #[error("additional authentication is required")]
    AuthRequired(Box<UiaChallenge>),
    /// A room version outside 1–12 (spec: `M_UNSUPPORTED_ROOM_VERSION`).
    #[error("{0}")]
    UnsupportedRoomVersion(#[from] lattice_core::room_version::UnsupportedRoomVersion),
    /// A PDU that failed its format, signature or hash checks; nothing was stored.
    #[error("invalid PDU: {0}")]
    InvalidPdu(#[from] lattice_core::pdu::PduError),
    /// Events an event refers to are not stored (fetching them over federation comes later).
    #[error("unknown events: {0}")]
    MissingEvents(String),
    /// A room version the other server does not support (`M_INCOMPATIBLE_ROOM_VERSION`).
    #[error("the room is version {0}, which the asking server does not support")]
    IncompatibleRoomVersion(String),
    /// Another server's answer made the request fail (502).
    #[error("{0}")]
    Remote(String),
    /// Talking to another server failed.
    #[error("federation: {0}")]
    Federation(#[from] lattice_federation::FederationError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("internal error: {0}")]
    Internal(String),
}
