//! The one place where errors become Matrix error responses (status + `errcode`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lattice_federation::FederationError;
use lattice_service::ServiceError;
use serde_json::{Value, json};

#[derive(Debug)]
pub enum ApiError {
    Service(ServiceError),
    MissingToken,
    NotJson(String),
    BadJson(String),
    TooLarge(usize),
    UnknownEndpoint,
    MethodNotAllowed,
    RateLimited { retry_after_ms: u64 },
    ThreepidNotFound,
    InvalidParam(String),
    Unsupported(String),
    Federation(FederationError),
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        ApiError::Service(error)
    }
}

fn body(errcode: &str, message: impl Into<String>) -> Value {
    json!({ "errcode": errcode, "error": message.into() })
}

/// The standard error response body of a service error (a delayed event's stored error).
pub(crate) fn error_body(error: ServiceError) -> Value {
    service_error(error).1
}

fn service_error(error: ServiceError) -> (StatusCode, Value) {
    use ServiceError as E;
    let message = error.to_string();
    match error {
        E::Forbidden(_) | E::RegistrationDisabled => (StatusCode::FORBIDDEN, body("M_FORBIDDEN", message)),
        E::UnknownToken { soft_logout } => {
            let mut value = body("M_UNKNOWN_TOKEN", message);
            if soft_logout {
                value["soft_logout"] = json!(true);
            }
            (StatusCode::UNAUTHORIZED, value)
        }
        E::NotFound(_) => (StatusCode::NOT_FOUND, body("M_NOT_FOUND", message)),
        E::BadJson(_) => (StatusCode::BAD_REQUEST, body("M_BAD_JSON", message)),
        E::InvalidParam(_) => (StatusCode::BAD_REQUEST, body("M_INVALID_PARAM", message)),
        E::MissingParam(_) => (StatusCode::BAD_REQUEST, body("M_MISSING_PARAM", message)),
        E::BadRequest(_) => (StatusCode::BAD_REQUEST, body("M_UNKNOWN", message)),
        E::ServerManaged(_) => (StatusCode::METHOD_NOT_ALLOWED, body("M_BAD_JSON", message)),
        E::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, body("M_TOO_LARGE", message)),
        E::CannotOverwriteMedia => (StatusCode::CONFLICT, body("M_CANNOT_OVERWRITE_MEDIA", message)),
        E::NotYetUploaded => (StatusCode::GATEWAY_TIMEOUT, body("M_NOT_YET_UPLOADED", message)),
        E::InvalidUsername(_) => (StatusCode::BAD_REQUEST, body("M_INVALID_USERNAME", message)),
        E::UserInUse => (StatusCode::BAD_REQUEST, body("M_USER_IN_USE", message)),
        E::UserDeactivated => (StatusCode::FORBIDDEN, body("M_USER_DEACTIVATED", message)),
        E::GuestAccessForbidden => (StatusCode::FORBIDDEN, body("M_GUEST_ACCESS_FORBIDDEN", message)),
        E::ThreepidDenied => (StatusCode::FORBIDDEN, body("M_THREEPID_DENIED", message)),
        E::LimitExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, body("M_LIMIT_EXCEEDED", message)),
        E::MaxDelayExceeded { max_delay_ms } => {
            let mut value = body("M_MAX_DELAY_EXCEEDED", message);
            // The stable name and the MSC's unstable one, for clients of either.
            value["max_delay"] = json!(max_delay_ms);
            value["org.matrix.msc4140.max_delay"] = json!(max_delay_ms);
            (StatusCode::BAD_REQUEST, value)
        }
        E::TooManyDelayedEvents { retry_after_ms } => {
            let mut value = body("M_LIMIT_EXCEEDED", message);
            value["retry_after_ms"] = json!(retry_after_ms);
            (StatusCode::TOO_MANY_REQUESTS, value)
        }
        E::Conflict(_) => (StatusCode::CONFLICT, body("M_UNKNOWN", message)),
        E::RoomInUse(_) => (StatusCode::BAD_REQUEST, body("M_ROOM_IN_USE", message)),
        // The spec's example for a taken alias is 409 with `M_UNKNOWN`; it names no other code.
        E::AliasInUse(_) => (StatusCode::CONFLICT, body("M_UNKNOWN", message)),
        E::BadAlias(_) => (StatusCode::BAD_REQUEST, body("M_BAD_ALIAS", message)),
        E::UnsupportedRoomVersion(_) => (StatusCode::BAD_REQUEST, body("M_UNSUPPORTED_ROOM_VERSION", message)),
        E::InvalidPdu(_) => (StatusCode::BAD_REQUEST, body("M_BAD_JSON", message)),
        E::MissingEvents(_) => (StatusCode::NOT_FOUND, body("M_NOT_FOUND", message)),
        E::WrongRoomKeysVersion { current_version } => {
            let mut value = body("M_WRONG_ROOM_KEYS_VERSION", message);
            value["current_version"] = json!(current_version);
            (StatusCode::FORBIDDEN, value)
        }
        E::AuthRequired(challenge) => (StatusCode::UNAUTHORIZED, challenge.to_json()),
        E::IncompatibleRoomVersion(version) => {
            let mut value = body("M_INCOMPATIBLE_ROOM_VERSION", message);
            value["room_version"] = json!(version);
            (StatusCode::BAD_REQUEST, value)
        }
        E::Remote(_) => (StatusCode::BAD_GATEWAY, body("M_UNKNOWN", message)),
        E::Federation(error) => federation_error(error),
        E::Storage(_) | E::Internal(_) => {
            tracing::error!(error = %message, "internal error");
            (StatusCode::INTERNAL_SERVER_ERROR, body("M_UNKNOWN", "internal server error"))
        }
    }
}

fn federation_error(error: FederationError) -> (StatusCode, Value) {
    use FederationError as E;
    let message = error.to_string();
    match error {
        E::Unauthorized(_) => (StatusCode::UNAUTHORIZED, body("M_UNAUTHORIZED", message)),
        E::Denied(_) => (StatusCode::FORBIDDEN, body("M_FORBIDDEN", message)),
        E::InvalidServerName(_) | E::InvalidUrl(_) => (StatusCode::BAD_REQUEST, body("M_INVALID_PARAM", message)),
        E::AddressDenied(_) => (StatusCode::FORBIDDEN, body("M_FORBIDDEN", message)),
        E::TimedOut(_) => (StatusCode::GATEWAY_TIMEOUT, body("M_UNKNOWN", message)),
        // Another server failed us: the caller learns which, not our internals.
        E::Resolve { .. }
        | E::BackingOff { .. }
        | E::Transport { .. }
        | E::Status { .. }
        | E::Redirect { .. }
        | E::InvalidResponse { .. } => (StatusCode::BAD_GATEWAY, body("M_UNKNOWN", message)),
        E::Storage(_) | E::Invalid(_) => {
            tracing::error!(error = %message, "internal federation error");
            (StatusCode::INTERNAL_SERVER_ERROR, body("M_UNKNOWN", "internal server error"))
        }
    }
}

impl ApiError {
    fn status_and_body(self) -> (StatusCode, Value) {
        match self {
            ApiError::Service(error) => service_error(error),
            ApiError::MissingToken => (StatusCode::UNAUTHORIZED, body("M_MISSING_TOKEN", "missing access token")),
            ApiError::NotJson(m) => (StatusCode::BAD_REQUEST, body("M_NOT_JSON", m)),
            ApiError::BadJson(m) => (StatusCode::BAD_REQUEST, body("M_BAD_JSON", m)),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                body("M_TOO_LARGE", format!("request body is larger than {limit} bytes")),
            ),
            ApiError::UnknownEndpoint => (StatusCode::NOT_FOUND, body("M_UNRECOGNIZED", "unrecognized request")),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, body("M_UNRECOGNIZED", "method not allowed for this endpoint"))
            }
            ApiError::RateLimited { retry_after_ms } => {
                let mut value = body("M_LIMIT_EXCEEDED", "too many requests");
                value["retry_after_ms"] = json!(retry_after_ms);
                (StatusCode::TOO_MANY_REQUESTS, value)
            }
            ApiError::ThreepidNotFound => {
                (StatusCode::BAD_REQUEST, body("M_THREEPID_NOT_FOUND", "no account has this third-party identifier"))
            }
            ApiError::InvalidParam(m) => (StatusCode::BAD_REQUEST, body("M_INVALID_PARAM", m)),
            ApiError::Unsupported(m) => (StatusCode::BAD_REQUEST, body("M_UNKNOWN", m)),
            ApiError::Federation(error) => federation_error(error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_ms }
            | ApiError::Service(ServiceError::TooManyDelayedEvents { retry_after_ms }) => {
                Some(retry_after_ms.div_ceil(1000))
            }
            _ => None,
        };
        let (status, value) = self.status_and_body();
        let mut response = (status, axum::Json(value)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use lattice_core::room_version::RoomVersion;

    use super::*;

    /// The mapping, as data: (error, status, errcode).
    #[test]
    fn service_errors_map_to_their_matrix_errors() {
        let unsupported = RoomVersion::parse("13").unwrap_err();
        let cases: Vec<(ServiceError, u16, &str)> = vec![
            (ServiceError::Forbidden("no".into()), 403, "M_FORBIDDEN"),
            (ServiceError::UnknownToken { soft_logout: true }, 401, "M_UNKNOWN_TOKEN"),
            (ServiceError::NotFound("x".into()), 404, "M_NOT_FOUND"),
            (ServiceError::BadRequest("x".into()), 400, "M_UNKNOWN"),
            (ServiceError::UserInUse, 400, "M_USER_IN_USE"),
            (ServiceError::InvalidUsername("x".into()), 400, "M_INVALID_USERNAME"),
            (ServiceError::UserDeactivated, 403, "M_USER_DEACTIVATED"),
            (ServiceError::GuestAccessForbidden, 403, "M_GUEST_ACCESS_FORBIDDEN"),
            (ServiceError::ThreepidDenied, 403, "M_THREEPID_DENIED"),
            (ServiceError::TooLarge { what: "x", limit: 1 }, 413, "M_TOO_LARGE"),
            (ServiceError::ServerManaged("x".into()), 405, "M_BAD_JSON"),
            (ServiceError::UnsupportedRoomVersion(unsupported), 400, "M_UNSUPPORTED_ROOM_VERSION"),
            (ServiceError::RoomInUse("x".into()), 400, "M_ROOM_IN_USE"),
            (ServiceError::AliasInUse("x".into()), 409, "M_UNKNOWN"),
            (ServiceError::BadAlias("x".into()), 400, "M_BAD_ALIAS"),
            (ServiceError::WrongRoomKeysVersion { current_version: "2".into() }, 403, "M_WRONG_ROOM_KEYS_VERSION"),
            (ServiceError::Internal("boom".into()), 500, "M_UNKNOWN"),
            (ServiceError::CannotOverwriteMedia, 409, "M_CANNOT_OVERWRITE_MEDIA"),
            (ServiceError::NotYetUploaded, 504, "M_NOT_YET_UPLOADED"),
            (ServiceError::MaxDelayExceeded { max_delay_ms: 10 }, 400, "M_MAX_DELAY_EXCEEDED"),
            (ServiceError::TooManyDelayedEvents { retry_after_ms: 10 }, 429, "M_LIMIT_EXCEEDED"),
            (ServiceError::Conflict("x".into()), 409, "M_UNKNOWN"),
        ];
        for (error, status, errcode) in cases {
            let (got_status, body) = ApiError::Service(error).status_and_body();
            assert_eq!((got_status.as_u16(), body["errcode"].as_str().unwrap()), (status, errcode));
        }
        let (_, body) =
            ApiError::Service(ServiceError::MaxDelayExceeded { max_delay_ms: 86_400_000 }).status_and_body();
        assert_eq!(body["max_delay"], 86_400_000);
        let (_, body) = ApiError::Service(ServiceError::UnknownToken { soft_logout: true }).status_and_body();
        assert_eq!(body["soft_logout"], true);
        let federation: Vec<(FederationError, u16, &str)> = vec![
            (FederationError::Unauthorized("bad sig".into()), 401, "M_UNAUTHORIZED"),
            (FederationError::InvalidServerName("x y".into()), 400, "M_INVALID_PARAM"),
            (FederationError::Transport { server: "a".into(), detail: "refused".into() }, 502, "M_UNKNOWN"),
            (FederationError::Invalid("bug".into()), 500, "M_UNKNOWN"),
            (FederationError::AddressDenied("10.0.0.1".into()), 403, "M_FORBIDDEN"),
            (FederationError::TimedOut("slow.example".into()), 504, "M_UNKNOWN"),
            (FederationError::InvalidUrl("ftp://x".into()), 400, "M_INVALID_PARAM"),
        ];
        for (error, status, errcode) in federation {
            let (got_status, body) = ApiError::Federation(error).status_and_body();
            assert_eq!((got_status.as_u16(), body["errcode"].as_str().unwrap()), (status, errcode));
        }
        let (_, body) = ApiError::RateLimited { retry_after_ms: 1500 }.status_and_body();
        assert_eq!(body["retry_after_ms"], 1500);
    }
}
