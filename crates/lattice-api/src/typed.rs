//! ruma's client-API request and response types at the edge: a handler that takes
//! [`Ruma<T>`] gets its path, query and body parsed and checked by `T`'s own definition, and one
//! that returns [`RumaResponse<T>`] answers with the shape the spec's type gives. Errors keep
//! Lattice's mapping: not JSON → `M_NOT_JSON`; JSON of the wrong shape, or an identifier that
//! does not parse → `M_BAD_JSON` / `M_INVALID_PARAM`; too large → `M_TOO_LARGE`.

use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::response::{IntoResponse, Response};
use ruma::api::error::{DeserializationError, FromHttpRequestError};
use ruma::api::{IncomingRequest, IncomingRequestExt, OutgoingResponse, OutgoingResponseExt};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::read_body;

/// A request parsed into ruma's type for its endpoint.
pub struct Ruma<T>(pub T);

impl<T: IncomingRequest + Send> FromRequest<AppState> for Ruma<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let path = RawPathParams::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ApiError::InvalidParam(format!("path: {e}")))?;
        // `RawPathParams` hands out the segments percent-decoded, as ruma asks.
        let args: Vec<String> = path.iter().map(|(_, value)| value.to_owned()).collect();
        let bytes = read_body(body, state.config.max_request_bytes).await?;
        // A bodiless request reads as `{}`, as everywhere else, for endpoints with only optional
        // fields.
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".to_vec() } else { bytes.to_vec() };
        let request = http::Request::from_parts(parts, bytes.as_slice());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        T::try_from_http_request(request, &args).map(Ruma).map_err(request_error)
    }
}

fn request_error(error: FromHttpRequestError) -> ApiError {
    match error {
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) if e.is_syntax() || e.is_eof() => {
            ApiError::NotJson(format!("body is not valid JSON: {e}"))
        }
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) => ApiError::BadJson(e.to_string()),
        FromHttpRequestError::Deserialization(DeserializationError::Ident(e)) => {
            ApiError::InvalidParam(format!("invalid identifier: {e}"))
        }
        FromHttpRequestError::Deserialization(DeserializationError::Query(e)) => {
            ApiError::InvalidParam(format!("query: {e}"))
        }
        FromHttpRequestError::MethodMismatch { .. } => ApiError::MethodNotAllowed,
        other => ApiError::BadJson(other.to_string()),
    }
}

/// A JSON value the service built, as the raw JSON ruma's response types carry.
pub fn raw<T, V: serde::Serialize + ?Sized>(value: &V) -> Result<ruma::serde::Raw<T>, ApiError> {
    serde_json::value::to_raw_value(value)
        .map(ruma::serde::Raw::from_json)
        .map_err(|e| ApiError::Service(lattice_service::ServiceError::Internal(e.to_string())))
}

/// A response in ruma's type for its endpoint.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<Vec<u8>>() {
            Ok(response) => response.map(axum::body::Body::from).into_response(),
            Err(error) => {
                tracing::error!(%error, "a response did not serialise");
                ApiError::Service(lattice_service::ServiceError::Internal(error.to_string())).into_response()
            }
        }
    }
}
