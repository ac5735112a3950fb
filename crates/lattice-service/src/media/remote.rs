//! Media of other servers: fetched over federation on first request (the authenticated
//! `/_matrix/federation/v1/media/download`, falling back to the legacy
//! `/_matrix/media/v3/download` for servers without it), streamed into the blob store, bounded
//! by `max_upload_bytes`, and cached (`media_remote`). A `Location` answer (media on a CDN: a
//! `Location` part of the `multipart/mixed` answer, or a 307/308 redirect) is followed as a
//! plain URL through the federation client's [`WebFetcher`](lattice_federation::WebFetcher),
//! under the federation's outbound address policy, so another server cannot make this one
//! request addresses inside the operator's network.

use std::time::Duration;

use lattice_federation::{Auth, FederationError};
use ruma::ServerName;

use super::multipart::{self, MultipartReader};
use super::{MediaFile, ThumbnailMethod, UploadTarget, serving};
use crate::{Service, ServiceError};

impl Service {
    /// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`: local media, or another
    /// server's (cached here, or fetched when federation is on; else `M_NOT_FOUND`).
    pub async fn media_download(
        &self,
        server: &ServerName,
        media_id: &str,
        wait: Duration,
    ) -> Result<MediaFile, ServiceError> {
        self.ensure_media(server, media_id).await?;
        self.media.open_stored(server, media_id, wait).await
    }

    /// `GET /_matrix/client/v1/media/thumbnail/...`: a thumbnail made here, of another server's
    /// media from the cached original.
    pub async fn media_thumbnail(
        &self,
        server: &ServerName,
        media_id: &str,
        size: (u32, u32, ThumbnailMethod),
        animated: bool,
        wait: Duration,
    ) -> Result<MediaFile, ServiceError> {
        self.ensure_media(server, media_id).await?;
        self.media.thumbnail(server, media_id, size, animated, wait).await
    }

    /// Validates the ID, and fetches another server's media unless it is cached.
    async fn ensure_media(&self, server: &ServerName, media_id: &str) -> Result<(), ServiceError> {
        if !serving::valid_media_id(media_id) {
            return Err(ServiceError::InvalidParam(format!("invalid media ID {media_id:?}")));
        }
        if server == self.server_name() || self.media.is_cached(server, media_id).await? {
            return Ok(());
        }
        let Some(client) = self.federation.client() else {
            return Err(ServiceError::NotFound(format!(
                "mxc://{server}/{media_id} is another server's media, and federation is off"
            )));
        };
        let path = format!("/_matrix/federation/v1/media/download/{media_id}");
        let response = match client.get_streaming(server, &path, Auth::Signed).await {
            Ok(response) => response,
            Err(FederationError::Redirect { location, .. }) => {
                return self.cache_from_location(&client, server, media_id, &location, None).await;
            }
            Err(FederationError::Status { status: 400 | 404 | 405, body, .. }) if body.contains("M_UNRECOGNIZED") => {
                tracing::debug!(%server, "no federation media endpoint; trying the legacy one");
                let legacy =
                    format!("/_matrix/media/v3/download/{server}/{media_id}?allow_remote=false&allow_redirect=false");
                let response = client.get_streaming(server, &legacy, Auth::Unsigned).await.map_err(not_found_on_4xx)?;
                return self.cache_plain(server, media_id, response).await;
            }
            Err(error) => return Err(not_found_on_4xx(error)),
        };
        self.cache_multipart(server, media_id, response).await
    }

    async fn cache_multipart(
        &self,
        server: &ServerName,
        media_id: &str,
        mut response: reqwest::Response,
    ) -> Result<(), ServiceError> {
        let remote = |detail: String| ServiceError::Remote(format!("{server} answered media badly: {detail}"));
        let client = self.federation.client();
        let content_type = header(&response, "content-type").unwrap_or_default();
        let boundary = multipart::boundary_of(&content_type).ok_or_else(|| remote("not multipart/mixed".into()))?;
        let mut reader = MultipartReader::new(&boundary);
        let mut upload = self.media.begin_upload(None).await?;
        let mut headers = None;
        while let Some(chunk) = response.chunk().await.map_err(|e| remote(e.to_string()))? {
            if headers.is_none() {
                headers = reader.feed_head(&chunk).map_err(remote)?;
                if headers.is_some() {
                    upload.write(&reader.body(&[])).await.map_err(too_large_remote)?;
                }
            } else {
                upload.write(&reader.body(&chunk)).await.map_err(too_large_remote)?;
            }
        }
        let headers = headers.ok_or_else(|| remote("the answer ended in its head".into()))?;
        reader.finish().map_err(remote)?;
        if let Some(location) = headers.location {
            drop(upload);
            let client = client.ok_or_else(|| ServiceError::Internal("federation is off".into()))?;
            return self.cache_from_location(&client, server, media_id, &location, headers.content_type).await;
        }
        let filename = headers.content_disposition.as_deref().and_then(multipart::disposition_filename);
        self.media
            .finish_upload(upload, None, headers.content_type, filename, UploadTarget::Remote(server, media_id))
            .await?;
        Ok(())
    }

    /// Fetches another server's media from the URL it pointed at, under the federation's
    /// address policy, and caches it as that server's media.
    async fn cache_from_location(
        &self,
        client: &lattice_federation::FederationClient,
        server: &ServerName,
        media_id: &str,
        location: &str,
        part_content_type: Option<String>,
    ) -> Result<(), ServiceError> {
        let found = match client.web_fetcher().get(location, "*/*").await {
            Ok(found) => found,
            Err(FederationError::AddressDenied(host)) => {
                return Err(ServiceError::Remote(format!(
                    "{server} pointed its media at {host}, an address this server does not connect to"
                )));
            }
            Err(FederationError::InvalidUrl(detail)) => {
                return Err(ServiceError::Remote(format!("{server} pointed its media at an unusable URL: {detail}")));
            }
            Err(error) => return Err(not_found_on_4xx(error)),
        };
        tracing::debug!(%server, %media_id, url = %found.url, "following a media Location");
        let mut response = found.response;
        let content_type = part_content_type.or_else(|| header(&response, "content-type"));
        let filename = header(&response, "content-disposition").as_deref().and_then(multipart::disposition_filename);
        let mut upload = self.media.begin_upload(None).await?;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ServiceError::Remote(format!("{server}'s media location answered badly: {e}")))?
        {
            upload.write(&chunk).await.map_err(too_large_remote)?;
        }
        self.media.finish_upload(upload, None, content_type, filename, UploadTarget::Remote(server, media_id)).await?;
        Ok(())
    }

    async fn cache_plain(
        &self,
        server: &ServerName,
        media_id: &str,
        mut response: reqwest::Response,
    ) -> Result<(), ServiceError> {
        let content_type = header(&response, "content-type");
        let filename = header(&response, "content-disposition").as_deref().and_then(multipart::disposition_filename);
        let mut upload = self.media.begin_upload(None).await?;
        while let Some(chunk) =
            response.chunk().await.map_err(|e| ServiceError::Remote(format!("{server} answered media badly: {e}")))?
        {
            upload.write(&chunk).await.map_err(too_large_remote)?;
        }
        self.media.finish_upload(upload, None, content_type, filename, UploadTarget::Remote(server, media_id)).await?;
        Ok(())
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The other server does not have it, refuses it, or cannot be reached: for the client, the
/// media is not found (the reason is in the message; nothing is cached, so a later request
/// tries again, after the destination's back-off).
fn not_found_on_4xx(error: FederationError) -> ServiceError {
    match error {
        FederationError::Status { status: 400..=499, server, .. } => {
            ServiceError::NotFound(format!("{server} has no such media"))
        }
        FederationError::Invalid(detail) => ServiceError::Internal(detail),
        other => {
            tracing::info!(error = %other, "fetching remote media failed");
            ServiceError::NotFound(format!("the media could not be fetched: {other}"))
        }
    }
}

fn too_large_remote(error: ServiceError) -> ServiceError {
    match error {
        ServiceError::TooLarge { limit, .. } => ServiceError::TooLarge { what: "the remote media", limit },
        other => other,
    }
}
