//! The content repository (issue #14, docs/media.md): uploads (`/_matrix/media/v3/upload`,
//! async `/_matrix/media/v1/create` + `PUT`), authenticated downloads and thumbnails
//! (`/_matrix/client/v1/media/*`), the legacy unauthenticated `/_matrix/media/v3/download` and
//! `/thumbnail` (only media from before the configured cutoff), `/config`, and the federation
//! endpoints (`multipart/mixed`). Bodies stream both ways: an upload is written to disk as it
//! arrives and stops at the size limit; a download is read from disk as it is sent.
//! URL previews (`/_matrix/client/v1/media/preview_url` and the legacy
//! `/_matrix/media/v3/preview_url`, both with an access token) when `[media.url_preview]` is on.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use lattice_service::media::serving::{self, ThumbnailMethod};
use lattice_service::media::{UploadTarget, multipart};
use lattice_service::{MediaFile, ServiceError};
use ruma::OwnedServerName;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Routes;
use super::federation::ServerAuth;
use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, PathParams, QueryParams};

/// Bytes read from the store per body chunk: 64 KiB (the default 4 KiB made downloads a sixth
/// as fast as uploads, docs/benchmarks.md).
const STREAM_CHUNK: usize = 64 << 10;

/// Sandboxes whatever a browser makes of a media URL.
const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; object-src 'self';";

pub fn routes() -> Routes {
    Routes::new()
        .route("/_matrix/media/v3/upload", post(upload))
        .route("/_matrix/media/v1/create", post(create))
        .route("/_matrix/media/v3/upload/{server_name}/{media_id}", axum::routing::put(upload_reserved))
        .route("/_matrix/client/v1/media/config", get(config))
        .route("/_matrix/media/v3/config", get(config))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}", get(download))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}", get(download_named))
        .route("/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}", get(thumbnail))
        .route("/_matrix/media/v3/download/{server_name}/{media_id}", get(legacy_download))
        .route("/_matrix/media/v3/download/{server_name}/{media_id}/{file_name}", get(legacy_download_named))
        .route("/_matrix/media/v3/thumbnail/{server_name}/{media_id}", get(legacy_thumbnail))
        .route("/_matrix/client/v1/media/preview_url", get(preview_url))
        // Always authenticated, as `/config`: unlike downloads, nothing here was frozen.
        .route("/_matrix/media/v3/preview_url", get(preview_url))
        .merge(federation_routes())
}

/// The server-server media endpoints (also on the federation listener).
pub fn federation_routes() -> Routes {
    Routes::new()
        .route("/_matrix/federation/v1/media/download/{media_id}", get(federation_download))
        .route("/_matrix/federation/v1/media/thumbnail/{media_id}", get(federation_thumbnail))
}

#[derive(Deserialize)]
struct UploadQuery {
    filename: Option<String>,
}

fn content_type_of(headers: &HeaderMap) -> Option<String> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Receives the body into an upload, chunk by chunk, stopping at the first refused chunk
/// (the upload is then dropped and its temporary file removed).
async fn receive(
    state: &AppState,
    uploader: &ruma::UserId,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<lattice_service::media::Upload> {
    let max = state.service.media().config().max_upload_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max) {
        return Err(
            ServiceError::TooLarge { what: "the upload", limit: usize::try_from(max).unwrap_or(usize::MAX) }.into()
        );
    }
    let mut upload = state.service.media().begin_upload(Some(uploader)).await?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ServiceError::BadRequest(format!("reading the upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            upload.write(&data).await?;
        }
    }
    Ok(upload)
}

async fn upload(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(query): QueryParams<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let upload = receive(&state, &session.user_id, &headers, body).await?;
    let media = state.service.media();
    let media_id = media
        .finish_upload(upload, Some(&session.user_id), content_type_of(&headers), query.filename, UploadTarget::New)
        .await?;
    Ok(Json(json!({ "content_uri": format!("mxc://{}/{media_id}", state.service.server_name()) })))
}

async fn create(State(state): State<AppState>, Auth(session): Auth) -> ApiResult<Json<Value>> {
    let (media_id, expires) = state.service.media().reserve(&session.user_id).await?;
    Ok(Json(json!({
        "content_uri": format!("mxc://{}/{media_id}", state.service.server_name()),
        "unused_expires_at": expires,
    })))
}

async fn upload_reserved(
    State(state): State<AppState>,
    Auth(session): Auth,
    PathParams((server_name, media_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let server = parse_server_name(&server_name)?;
    check_media_id(&media_id)?;
    if server != state.service.server_name() {
        return Err(ServiceError::NotFound(format!("mxc://{server}/{media_id} is not this server's")).into());
    }
    let media = state.service.media();
    media.check_reserved(&session.user_id, &media_id).await?;
    let upload = receive(&state, &session.user_id, &headers, body).await?;
    media
        .finish_upload(
            upload,
            Some(&session.user_id),
            content_type_of(&headers),
            query.filename,
            UploadTarget::Reserved(&media_id),
        )
        .await?;
    Ok(Json(json!({})))
}

async fn config(State(state): State<AppState>, Auth(_): Auth) -> Json<Value> {
    Json(json!({ "m.upload.size": state.service.media().config().max_upload_bytes }))
}

#[derive(Deserialize)]
struct PreviewQuery {
    url: Option<String>,
    /// The spec's preferred point in time: any cached preview (at most `cache_ttl` old) is
    /// answered whatever it says, which the spec allows ("may return a newer version").
    #[serde(default)]
    ts: Option<u64>,
}

async fn preview_url(
    State(state): State<AppState>,
    Auth(session): Auth,
    QueryParams(query): QueryParams<PreviewQuery>,
) -> ApiResult<Json<Value>> {
    let media = state.service.media();
    if !media.url_previews_enabled() {
        // The server offers no previews: answered as an endpoint it does not serve.
        return Err(ApiError::UnknownEndpoint);
    }
    let url = query.url.ok_or_else(|| ServiceError::MissingParam("the url parameter is required".into()))?;
    state.limits.url_preview_per_user.check(session.user_id.as_str())?;
    tracing::debug!(%url, ts = ?query.ts, "URL preview");
    Ok(Json(Value::Object(media.preview_url(&url).await?)))
}

fn parse_server_name(name: &str) -> ApiResult<OwnedServerName> {
    OwnedServerName::try_from(name).map_err(|_| ApiError::InvalidParam(format!("invalid server name {name:?}")))
}

fn check_media_id(media_id: &str) -> ApiResult<()> {
    if serving::valid_media_id(media_id) {
        Ok(())
    } else {
        Err(ApiError::InvalidParam(format!("invalid media ID {media_id:?}")))
    }
}

#[derive(Deserialize)]
struct DownloadQuery {
    timeout_ms: Option<u64>,
}

fn wait_of(timeout_ms: Option<u64>) -> Duration {
    timeout_ms.map_or(lattice_service::media::MAX_UPLOAD_WAIT, Duration::from_millis)
}

/// The answer carrying media: safe type and disposition, sandboxing headers, streamed body.
fn media_response(file: MediaFile, filename: Option<&str>) -> Response {
    let content_type = serving::served_content_type(file.content_type.as_deref());
    let disposition = serving::content_disposition(Some(&content_type), filename.or(file.filename.as_deref()));
    let mut response =
        Response::new(Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file.reader, STREAM_CHUNK)));
    let headers = response.headers_mut();
    let value =
        |text: &str| HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, value(&content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.size));
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).unwrap_or(HeaderValue::from_static("attachment")),
    );
    insert_safety_headers(headers);
    response
}

/// A thumbnail is always served inline (the spec's MUST; its type is a detected image type),
/// named `thumbnail.<extension>`.
fn thumbnail_response(file: MediaFile) -> Response {
    let extension = match file.content_type.as_deref() {
        Some("image/jpeg") => "jpg",
        Some("image/gif") => "gif",
        Some("image/webp") => "webp",
        _ => "png",
    };
    media_response(file, Some(&format!("thumbnail.{extension}")))
}

fn insert_safety_headers(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
}

async fn download(
    State(state): State<AppState>,
    Auth(_): Auth,
    PathParams((server_name, media_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<DownloadQuery>,
) -> ApiResult<Response> {
    serve_download(&state, &server_name, &media_id, None, query.timeout_ms).await
}

async fn download_named(
    State(state): State<AppState>,
    Auth(_): Auth,
    PathParams((server_name, media_id, file_name)): PathParams<(String, String, String)>,
    QueryParams(query): QueryParams<DownloadQuery>,
) -> ApiResult<Response> {
    serve_download(&state, &server_name, &media_id, Some(&file_name), query.timeout_ms).await
}

async fn serve_download(
    state: &AppState,
    server_name: &str,
    media_id: &str,
    file_name: Option<&str>,
    timeout_ms: Option<u64>,
) -> ApiResult<Response> {
    let server = parse_server_name(server_name)?;
    check_media_id(media_id)?;
    let file = state.service.media_download(&server, media_id, wait_of(timeout_ms)).await?;
    Ok(media_response(file, file_name))
}

#[derive(Deserialize)]
struct ThumbnailQuery {
    width: u32,
    height: u32,
    method: Option<String>,
    timeout_ms: Option<u64>,
    /// Absent means no animation (the spec's SHOULD NOT).
    #[serde(default)]
    animated: bool,
}

impl ThumbnailQuery {
    fn size(&self) -> ApiResult<(u32, u32, ThumbnailMethod)> {
        let method = match self.method.as_deref() {
            None | Some("scale") => ThumbnailMethod::Scale,
            Some("crop") => ThumbnailMethod::Crop,
            Some(other) => return Err(ApiError::InvalidParam(format!("method must be crop or scale, not {other:?}"))),
        };
        if self.width == 0 || self.height == 0 {
            return Err(ApiError::InvalidParam("width and height must be positive".into()));
        }
        Ok((self.width, self.height, method))
    }
}

async fn thumbnail(
    State(state): State<AppState>,
    Auth(_): Auth,
    PathParams((server_name, media_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<ThumbnailQuery>,
) -> ApiResult<Response> {
    let server = parse_server_name(&server_name)?;
    check_media_id(&media_id)?;
    let file = state
        .service
        .media_thumbnail(&server, &media_id, query.size()?, query.animated, wait_of(query.timeout_ms))
        .await?;
    Ok(thumbnail_response(file))
}

/// The legacy endpoints serve only media created before the cutoff (`[media]
/// unauthenticated_media_before`, by default the first start with media), and never fetch;
/// everything else is `404 M_NOT_FOUND`, as Synapse answers once it freezes them.
async fn legacy_download(
    State(state): State<AppState>,
    PathParams((server_name, media_id)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    serve_legacy(&state, &server_name, &media_id, None).await
}

async fn legacy_download_named(
    State(state): State<AppState>,
    PathParams((server_name, media_id, file_name)): PathParams<(String, String, String)>,
) -> ApiResult<Response> {
    serve_legacy(&state, &server_name, &media_id, Some(&file_name)).await
}

async fn serve_legacy(
    state: &AppState,
    server_name: &str,
    media_id: &str,
    file_name: Option<&str>,
) -> ApiResult<Response> {
    let server = parse_server_name(server_name)?;
    check_media_id(media_id)?;
    let file = state.service.media().open_legacy(&server, media_id).await?;
    Ok(media_response(file, file_name))
}

async fn legacy_thumbnail(
    State(state): State<AppState>,
    PathParams((server_name, media_id)): PathParams<(String, String)>,
    QueryParams(query): QueryParams<ThumbnailQuery>,
) -> ApiResult<Response> {
    let server = parse_server_name(&server_name)?;
    check_media_id(&media_id)?;
    let size = query.size()?;
    let media = state.service.media();
    // Only media the legacy download would serve.
    drop(media.open_legacy(&server, &media_id).await?);
    let file = media.thumbnail(&server, &media_id, size, query.animated, Duration::ZERO).await?;
    Ok(thumbnail_response(file))
}

/// Federation: this server's own media only, as `multipart/mixed` (metadata `{}`, then the
/// bytes).
async fn federation_download(
    State(state): State<AppState>,
    PathParams(media_id): PathParams<String>,
    QueryParams(query): QueryParams<DownloadQuery>,
    auth: ServerAuth,
) -> ApiResult<Response> {
    check_media_id(&media_id)?;
    tracing::debug!(origin = %auth.origin, media_id, "media requested over federation");
    let own = state.service.server_name().to_owned();
    let file = state.service.media().open_stored(&own, &media_id, wait_of(query.timeout_ms)).await?;
    Ok(multipart_response(file))
}

async fn federation_thumbnail(
    State(state): State<AppState>,
    PathParams(media_id): PathParams<String>,
    QueryParams(query): QueryParams<ThumbnailQuery>,
    auth: ServerAuth,
) -> ApiResult<Response> {
    check_media_id(&media_id)?;
    tracing::debug!(origin = %auth.origin, media_id, "thumbnail requested over federation");
    let size = query.size()?;
    let own = state.service.server_name().to_owned();
    let wait = wait_of(query.timeout_ms);
    let file = state.service.media().thumbnail(&own, &media_id, size, query.animated, wait).await?;
    Ok(multipart_response(file))
}

fn multipart_response(file: MediaFile) -> Response {
    use futures_util::StreamExt;
    let boundary = multipart::new_boundary();
    let content_type = serving::served_content_type(file.content_type.as_deref());
    let disposition = serving::content_disposition(Some(&content_type), file.filename.as_deref());
    let head = multipart::head(&boundary, &content_type, &disposition);
    let tail = multipart::tail(&boundary);
    let length = head.len() as u64 + file.size + tail.len() as u64;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(Bytes::from(head)) })
        .chain(tokio_util::io::ReaderStream::with_capacity(file.reader, STREAM_CHUNK))
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    let multipart_type = format!("multipart/mixed; boundary={boundary}");
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&multipart_type).unwrap_or(HeaderValue::from_static("multipart/mixed")),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    insert_safety_headers(headers);
    (StatusCode::OK, response).into_response()
}
