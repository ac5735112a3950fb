//! The media service (issue #14, [media.md](../../../../docs/media.md)): uploads, downloads,
//! thumbnails, and other servers' media cached here. Bytes live in a [`MediaStore`]
//! (content-addressed, deduplicated by SHA-256; the filesystem by default); what they are lives
//! in its tables, each change one atomic batch:
//!
//! - `media`: local media ID → [`MediaRecord`] (an async upload's reserved ID has no hash yet);
//!   the row `\0legacy_cutoff` holds the time before which media is served unauthenticated;
//! - `media_remote`: `server \0 media ID` → [`MediaRecord`] of another server's cached media;
//! - `media_thumbnails`: `server \0 media ID \0 WxH-method[-animated]` → [`ThumbnailRecord`];
//! - `media_blob_refs`: `hash \0 row` for every row naming a blob, so a blob is removed only
//!   when nothing names it;
//! - `media_usage`: user → [`UsageRecord`] (bytes uploaded, reserved async IDs);
//! - `media_previews`: URL → a cached URL preview and its fetch time ([`preview`]);
//! - `media_preview_images`: creation time (8 bytes, big-endian) ‖ media ID → `[]`: the images
//!   previews stored, deleted after `url_preview.image_retention`.
//!
//! A blob is committed (fsync, rename, directory fsync) before the batch naming it is written,
//! so a crash leaves at worst an unnamed blob, never a row naming missing bytes. Commits and
//! deletions of blobs are serialised by one lock, so a deletion never removes a blob an
//! upload of the same bytes is about to name.

pub mod multipart;
pub mod preview;
mod remote;
pub mod s3;
pub mod serving;
pub mod store;
pub mod thumbnail;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lattice_storage::{Direction, KeyRange, KvStore, ScopedStore, StorageError, Table, TableScope, WriteBatch};
use ruma::{ServerName, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use preview::UrlPreviewConfig;
pub use s3::{S3Config, S3MediaStore};
pub use serving::ThumbnailMethod;
pub use store::{BlobWriter, ContentHash, FsMediaStore, MediaStore};

use crate::{Clock, ServiceError};

pub const TABLES: TableScope = TableScope {
    owner: "media",
    tables: &[
        Table::Media,
        Table::MediaRemote,
        Table::MediaThumbnails,
        Table::MediaBlobRefs,
        Table::MediaUsage,
        Table::MediaPreviews,
        Table::MediaPreviewImages,
    ],
};

const LEGACY_CUTOFF_KEY: &[u8] = b"\0legacy_cutoff";
/// How often a batch is retried when a concurrent write changed a row it read (usage).
const WRITE_RETRIES: usize = 16;
/// The longest a download waits for an async upload (`timeout_ms`; the spec's default is 20 s).
pub const MAX_UPLOAD_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct MediaConfig {
    /// Where blobs are stored (`<data_dir>/media`); with `s3`, only uploads in progress.
    pub directory: PathBuf,
    /// Blobs in an S3-compatible bucket instead of `directory`.
    pub s3: Option<S3Config>,
    /// The largest upload (and remote file) accepted.
    pub max_upload_bytes: u64,
    /// Per-user total of uploaded bytes; `None`: no quota.
    pub max_user_bytes: Option<u64>,
    /// Media uploaded (or fetched) before this time is served by the legacy unauthenticated
    /// `/_matrix/media/v3/download|thumbnail`; `None`: the first start with media (freeze).
    pub legacy_cutoff_ms: Option<u64>,
    /// How long an ID from `POST /_matrix/media/v1/create` may wait for its upload.
    pub unused_expiry_ms: u64,
    /// How many such IDs a user may hold at once.
    pub max_pending_uploads: usize,
    /// URL previews; `None`: off.
    pub url_preview: Option<UrlPreviewConfig>,
    /// How long the images URL previews stored are kept (at least the preview cache's TTL, so
    /// a cached preview never names a deleted image).
    pub preview_image_retention_ms: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            directory: PathBuf::from("media"),
            s3: None,
            max_upload_bytes: 50 << 20,
            max_user_bytes: None,
            legacy_cutoff_ms: None,
            unused_expiry_ms: 24 * 3600 * 1000,
            max_pending_uploads: 50,
            url_preview: None,
            preview_image_retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// What a media ID names.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MediaRecord {
    /// The blob; `None` while an async upload waits for its bytes.
    #[serde(default)]
    pub hash: Option<String>,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
    /// The local uploader; empty for other servers' media.
    #[serde(default)]
    pub uploader: String,
    /// Upload (or fetch) time.
    pub created_ms: u64,
    /// An async upload's reservation ends then.
    #[serde(default)]
    pub unused_expires_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThumbnailRecord {
    pub hash: String,
    pub size: u64,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UsageRecord {
    #[serde(default)]
    pub bytes: u64,
    /// Async upload IDs reserved and not uploaded yet, with their expiry.
    #[serde(default)]
    pub pending: BTreeMap<String, u64>,
}

/// Bytes to send, with what the headers need.
pub struct MediaFile {
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    pub size: u64,
    pub content_type: Option<String>,
    pub filename: Option<String>,
}

/// An upload being received. Dropping it discards the bytes.
pub struct Upload {
    writer: Box<dyn BlobWriter>,
    limit: u64,
    quota_limited: bool,
    max_upload_bytes: u64,
}

impl Upload {
    /// Appends a chunk; past the size limit → `M_TOO_LARGE`, past the user's quota →
    /// `M_FORBIDDEN` (the spec's answer for a quota); the caller stops reading then.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
        if self.writer.written() + chunk.len() as u64 > self.limit {
            return Err(if self.quota_limited {
                ServiceError::Forbidden("this upload would exceed your media storage quota".into())
            } else {
                ServiceError::TooLarge {
                    what: "the upload",
                    limit: usize::try_from(self.max_upload_bytes).unwrap_or(usize::MAX),
                }
            });
        }
        self.writer.write(chunk).await
    }

    pub fn written(&self) -> u64 {
        self.writer.written()
    }
}

/// Where an upload goes.
pub enum UploadTarget<'a> {
    /// A new local media ID.
    New,
    /// An ID reserved with `create`.
    Reserved(&'a str),
    /// Another server's media, cached.
    Remote(&'a ServerName, &'a str),
    /// A new local media ID for a URL preview's image, listed for deletion after the
    /// preview image retention.
    PreviewImage,
}

fn decode<T: DeserializeOwned>(table: Table, raw: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(raw)
        .map_err(|e| ServiceError::Storage(StorageError::Corrupt { table: table.name(), detail: e.to_string() }))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("media records serialise to JSON")
}

fn remote_key(server: &ServerName, media_id: &str) -> Vec<u8> {
    [server.as_str().as_bytes(), b"\0", media_id.as_bytes()].concat()
}

fn thumbnail_prefix(server: &ServerName, media_id: &str) -> Vec<u8> {
    [remote_key(server, media_id).as_slice(), b"\0"].concat()
}

fn thumbnail_key(server: &ServerName, media_id: &str, size: (u32, u32, ThumbnailMethod), animated: bool) -> Vec<u8> {
    let mut key = thumbnail_prefix(server, media_id);
    key.extend_from_slice(format!("{}x{}-{}", size.0, size.1, size.2.as_str()).as_bytes());
    if animated {
        key.extend_from_slice(b"-animated");
    }
    key
}

fn preview_image_key(created_ms: u64, media_id: &str) -> Vec<u8> {
    [created_ms.to_be_bytes().as_slice(), media_id.as_bytes()].concat()
}

fn blob_ref(hash: &str, table: Table, key: &[u8]) -> Vec<u8> {
    [hash.as_bytes(), b"\0", table.name().as_bytes(), b"\0", key].concat()
}

pub struct Media {
    kv: Arc<dyn KvStore>,
    config: MediaConfig,
    clock: Arc<dyn Clock>,
    server_name: ruma::OwnedServerName,
    store: tokio::sync::OnceCell<Arc<dyn MediaStore>>,
    /// Serialises blob commits with blob deletions (see the module docs).
    blob_lock: tokio::sync::Mutex<()>,
    legacy_cutoff: tokio::sync::OnceCell<u64>,
    /// Built on the first preview.
    preview_fetcher: tokio::sync::OnceCell<lattice_federation::WebFetcher>,
}

impl Media {
    pub(crate) fn new(
        config: MediaConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        server_name: ruma::OwnedServerName,
    ) -> Self {
        Self {
            kv: ScopedStore::new(kv, TABLES),
            config,
            clock,
            server_name,
            store: tokio::sync::OnceCell::new(),
            blob_lock: tokio::sync::Mutex::new(()),
            legacy_cutoff: tokio::sync::OnceCell::new(),
            preview_fetcher: tokio::sync::OnceCell::new(),
        }
    }

    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    /// Opens the blob store (removing unfinished uploads of a crash) and fixes the legacy
    /// cutoff; the binary calls it at start so a broken media directory stops the start.
    pub async fn open(&self) -> Result<(), ServiceError> {
        self.store().await?;
        self.legacy_cutoff_ms().await?;
        Ok(())
    }

    async fn store(&self) -> Result<&Arc<dyn MediaStore>, ServiceError> {
        self.store
            .get_or_try_init(|| async {
                let directory = self.config.directory.clone();
                let s3 = self.config.s3.clone();
                let store = tokio::task::spawn_blocking(move || -> Result<Arc<dyn MediaStore>, ServiceError> {
                    Ok(match s3 {
                        Some(s3) => Arc::new(S3MediaStore::open(&s3, &directory.join("tmp"))?),
                        None => Arc::new(FsMediaStore::open(&directory)?),
                    })
                })
                .await
                .map_err(|e| ServiceError::Internal(format!("opening the media store: {e}")))??;
                store.check().await?;
                Ok::<Arc<dyn MediaStore>, ServiceError>(store)
            })
            .await
    }

    /// Media created before this is served by the legacy unauthenticated endpoints: the
    /// configured time, else the time this server first started with media (stored once).
    pub async fn legacy_cutoff_ms(&self) -> Result<u64, ServiceError> {
        if let Some(cutoff) = self.config.legacy_cutoff_ms {
            return Ok(cutoff);
        }
        self.legacy_cutoff
            .get_or_try_init(|| async {
                if let Some(raw) = self.kv.get(Table::Media, LEGACY_CUTOFF_KEY).await? {
                    return decode(Table::Media, &raw);
                }
                let now = self.clock.now_ms();
                let mut batch = WriteBatch::new();
                batch.expect(Table::Media, LEGACY_CUTOFF_KEY.to_vec(), None);
                batch.put(Table::Media, LEGACY_CUTOFF_KEY.to_vec(), encode(&now));
                match self.kv.write(batch).await {
                    Ok(()) => Ok(now),
                    Err(StorageError::Conflict) => match self.kv.get(Table::Media, LEGACY_CUTOFF_KEY).await? {
                        Some(raw) => decode(Table::Media, &raw),
                        None => Err(ServiceError::Internal("legacy cutoff vanished".into())),
                    },
                    Err(e) => Err(e.into()),
                }
            })
            .await
            .copied()
    }

    async fn get<T: DeserializeOwned>(&self, table: Table, key: &[u8]) -> Result<Option<(T, Vec<u8>)>, ServiceError> {
        match self.kv.get(table, key).await? {
            Some(raw) => Ok(Some((decode(table, &raw)?, raw))),
            None => Ok(None),
        }
    }

    async fn usage(&self, user: &UserId) -> Result<(UsageRecord, Option<Vec<u8>>), ServiceError> {
        Ok(match self.get::<UsageRecord>(Table::MediaUsage, user.as_str().as_bytes()).await? {
            Some((usage, raw)) => (usage, Some(raw)),
            None => (UsageRecord::default(), None),
        })
    }

    /// The bytes a user has uploaded (for operators and tests).
    pub async fn used_bytes(&self, user: &UserId) -> Result<u64, ServiceError> {
        Ok(self.usage(user).await?.0.bytes)
    }

    /// Starts receiving an upload of `uploader` (`None`: a remote file being cached).
    pub async fn begin_upload(&self, uploader: Option<&UserId>) -> Result<Upload, ServiceError> {
        let max = self.config.max_upload_bytes;
        let (limit, quota_limited) = match (uploader, self.config.max_user_bytes) {
            (Some(user), Some(quota)) => {
                let left = quota.saturating_sub(self.usage(user).await?.0.bytes);
                if left < max { (left, true) } else { (max, false) }
            }
            _ => (max, false),
        };
        let writer = self.store().await?.writer().await?;
        Ok(Upload { writer, limit, quota_limited, max_upload_bytes: max })
    }

    /// `POST /_matrix/media/v1/create`: a media ID reserved for `uploader`, with its expiry.
    pub async fn reserve(&self, uploader: &UserId) -> Result<(String, u64), ServiceError> {
        let now = self.clock.now_ms();
        for _ in 0..WRITE_RETRIES {
            let (mut usage, raw) = self.usage(uploader).await?;
            usage.pending.retain(|_, expires| *expires > now);
            if usage.pending.len() >= self.config.max_pending_uploads {
                return Err(ServiceError::LimitExceeded(
                    "too many media IDs waiting for their upload; upload to them first".into(),
                ));
            }
            let media_id = serving::new_media_id();
            let expires = now.saturating_add(self.config.unused_expiry_ms);
            usage.pending.insert(media_id.clone(), expires);
            let record = MediaRecord {
                uploader: uploader.to_string(),
                created_ms: now,
                unused_expires_ms: Some(expires),
                ..MediaRecord::default()
            };
            let mut batch = WriteBatch::new();
            batch.expect(Table::MediaUsage, uploader.as_str().as_bytes().to_vec(), raw);
            batch.expect(Table::Media, media_id.as_bytes().to_vec(), None);
            batch.put(Table::MediaUsage, uploader.as_str().as_bytes().to_vec(), encode(&usage));
            batch.put(Table::Media, media_id.as_bytes().to_vec(), encode(&record));
            match self.kv.write(batch).await {
                Ok(()) => return Ok((media_id, expires)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent media writes; try again".into()))
    }

    /// Checks, before the body is read, that `uploader` may upload to the reserved `media_id`:
    /// unknown or expired → `M_NOT_FOUND`, someone else's → `M_FORBIDDEN`, already uploaded
    /// → `M_CANNOT_OVERWRITE_MEDIA`.
    pub async fn check_reserved(&self, uploader: &UserId, media_id: &str) -> Result<(), ServiceError> {
        let not_found = || ServiceError::NotFound(format!("no media ID {media_id} is waiting for an upload"));
        if !serving::valid_media_id(media_id) {
            return Err(not_found());
        }
        let Some((record, _)) = self.get::<MediaRecord>(Table::Media, media_id.as_bytes()).await? else {
            return Err(not_found());
        };
        if record.uploader != uploader.as_str() {
            return Err(ServiceError::Forbidden("this media ID was created by another user".into()));
        }
        if record.hash.is_some() {
            return Err(ServiceError::CannotOverwriteMedia);
        }
        if record.unused_expires_ms.is_some_and(|expires| expires <= self.clock.now_ms()) {
            return Err(not_found());
        }
        Ok(())
    }

    /// Commits a received upload and names it: returns the media ID.
    pub async fn finish_upload(
        &self,
        upload: Upload,
        uploader: Option<&UserId>,
        content_type: Option<String>,
        filename: Option<String>,
        target: UploadTarget<'_>,
    ) -> Result<String, ServiceError> {
        let content_type = content_type.filter(|ct| serving::valid_content_type(ct));
        let filename = filename.map(|f| serving::sanitise_filename(&f)).filter(|f| !f.is_empty());
        let _blobs = self.blob_lock.lock().await;
        let blob = upload.writer.commit().await?;
        let result = self.name_blob(&blob, uploader, content_type, filename, target).await;
        if result.is_err() {
            self.collect_blob(&blob.hash).await?;
        }
        result
    }

    async fn name_blob(
        &self,
        blob: &store::StoredBlob,
        uploader: Option<&UserId>,
        content_type: Option<String>,
        filename: Option<String>,
        target: UploadTarget<'_>,
    ) -> Result<String, ServiceError> {
        let now = self.clock.now_ms();
        let hash = blob.hash.as_str().to_owned();
        for _ in 0..WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            let record = MediaRecord {
                hash: Some(hash.clone()),
                size: blob.size,
                content_type: content_type.clone(),
                filename: filename.clone(),
                uploader: uploader.map(|u| u.to_string()).unwrap_or_default(),
                created_ms: now,
                unused_expires_ms: None,
            };
            let (table, key, media_id) = match &target {
                UploadTarget::New | UploadTarget::PreviewImage => {
                    let id = serving::new_media_id();
                    batch.expect(Table::Media, id.as_bytes().to_vec(), None);
                    if matches!(target, UploadTarget::PreviewImage) {
                        batch.put(Table::MediaPreviewImages, preview_image_key(now, &id), Vec::new());
                    }
                    (Table::Media, id.as_bytes().to_vec(), id)
                }
                UploadTarget::Reserved(id) => {
                    let Some((reserved, raw)) = self.get::<MediaRecord>(Table::Media, id.as_bytes()).await? else {
                        return Err(ServiceError::NotFound(format!("no media ID {id} is waiting for an upload")));
                    };
                    if reserved.hash.is_some() {
                        return Err(ServiceError::CannotOverwriteMedia);
                    }
                    batch.expect(Table::Media, id.as_bytes().to_vec(), Some(raw));
                    (Table::Media, id.as_bytes().to_vec(), (*id).to_owned())
                }
                UploadTarget::Remote(server, id) => (Table::MediaRemote, remote_key(server, id), (*id).to_owned()),
            };
            batch.put(table, key.clone(), encode(&record));
            batch.put(Table::MediaBlobRefs, blob_ref(&hash, table, &key), Vec::new());
            if let Some(user) = uploader {
                let (mut usage, raw) = self.usage(user).await?;
                usage.bytes = usage.bytes.saturating_add(blob.size);
                usage.pending.remove(&media_id);
                batch.expect(Table::MediaUsage, user.as_str().as_bytes().to_vec(), raw);
                batch.put(Table::MediaUsage, user.as_str().as_bytes().to_vec(), encode(&usage));
            }
            match self.kv.write(batch).await {
                Ok(()) => {
                    tracing::info!(media_id = %media_id, size = blob.size, "media stored");
                    return Ok(media_id);
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent media writes; try again".into()))
    }

    /// Removes a blob no row names any more. Callers hold `blob_lock`.
    async fn collect_blob(&self, hash: &ContentHash) -> Result<(), ServiceError> {
        let prefix = [hash.as_str().as_bytes(), b"\0"].concat();
        let refs = self.kv.scan(Table::MediaBlobRefs, &KeyRange::prefix(&prefix), Direction::Forward, 1).await?;
        if refs.is_empty() {
            self.store().await?.delete(hash).await?;
        }
        Ok(())
    }

    async fn open_blob(&self, record_hash: &str) -> Result<(Pin<Box<dyn AsyncRead + Send>>, u64), ServiceError> {
        let hash = ContentHash::parse(record_hash)?;
        match self.store().await?.open(&hash).await? {
            Some(blob) => Ok((blob.reader, blob.size)),
            None => Err(ServiceError::Internal(format!("media blob {record_hash} is missing"))),
        }
    }

    fn not_found(server: &ServerName, media_id: &str) -> ServiceError {
        ServiceError::NotFound(format!("no media mxc://{server}/{media_id}"))
    }

    /// The record of local media, waiting up to `wait` for an async upload's bytes
    /// (`M_NOT_YET_UPLOADED` after that).
    async fn local_record(&self, media_id: &str, wait: Duration) -> Result<MediaRecord, ServiceError> {
        if !serving::valid_media_id(media_id) {
            return Err(Self::not_found(&self.server_name, media_id));
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_UPLOAD_WAIT);
        loop {
            let Some((record, _)) = self.get::<MediaRecord>(Table::Media, media_id.as_bytes()).await? else {
                return Err(Self::not_found(&self.server_name, media_id));
            };
            if record.hash.is_some() {
                return Ok(record);
            }
            if record.unused_expires_ms.is_some_and(|expires| expires <= self.clock.now_ms()) {
                return Err(Self::not_found(&self.server_name, media_id));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::NotYetUploaded);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Cached media of another server, if any.
    async fn remote_record(&self, server: &ServerName, media_id: &str) -> Result<Option<MediaRecord>, ServiceError> {
        Ok(self.get::<MediaRecord>(Table::MediaRemote, &remote_key(server, media_id)).await?.map(|(r, _)| r))
    }

    /// The record of `mxc://server/media_id` as stored here (local, or cached remote).
    async fn record(&self, server: &ServerName, media_id: &str, wait: Duration) -> Result<MediaRecord, ServiceError> {
        if server == self.server_name {
            return self.local_record(media_id, wait).await;
        }
        self.remote_record(server, media_id).await?.ok_or_else(|| Self::not_found(server, media_id))
    }

    async fn file_of(&self, record: MediaRecord) -> Result<MediaFile, ServiceError> {
        let hash = record.hash.ok_or_else(|| ServiceError::Internal("media without bytes".into()))?;
        let (reader, size) = self.open_blob(&hash).await?;
        Ok(MediaFile { reader, size, content_type: record.content_type, filename: record.filename })
    }

    /// Local media, or other servers' media already cached here.
    pub async fn open_stored(
        &self,
        server: &ServerName,
        media_id: &str,
        wait: Duration,
    ) -> Result<MediaFile, ServiceError> {
        let record = self.record(server, media_id, wait).await?;
        self.file_of(record).await
    }

    /// For the legacy unauthenticated endpoints: only media created before the cutoff.
    pub async fn open_legacy(&self, server: &ServerName, media_id: &str) -> Result<MediaFile, ServiceError> {
        let cutoff = self.legacy_cutoff_ms().await?;
        let record = self.record(server, media_id, Duration::ZERO).await.map_err(|e| match e {
            ServiceError::NotYetUploaded => Self::not_found(server, media_id),
            other => other,
        })?;
        if record.created_ms >= cutoff {
            return Err(Self::not_found(server, media_id));
        }
        self.file_of(record).await
    }

    /// Whether another server's media is cached here.
    pub async fn is_cached(&self, server: &ServerName, media_id: &str) -> Result<bool, ServiceError> {
        Ok(self.remote_record(server, media_id).await?.is_some())
    }

    /// A thumbnail of stored media (local or cached), made on first request and kept. With
    /// `animated`, an animation gets an animated thumbnail; without, never one.
    pub async fn thumbnail(
        &self,
        server: &ServerName,
        media_id: &str,
        requested: (u32, u32, ThumbnailMethod),
        animated: bool,
        wait: Duration,
    ) -> Result<MediaFile, ServiceError> {
        if requested.0 == 0 || requested.1 == 0 {
            return Err(ServiceError::InvalidParam("width and height must be positive".into()));
        }
        let size = serving::choose_thumbnail_size(requested.0, requested.1, requested.2);
        let original = self.record(server, media_id, wait).await?;
        let key = thumbnail_key(server, media_id, size, animated);
        if let Some((thumb, _)) = self.get::<ThumbnailRecord>(Table::MediaThumbnails, &key).await? {
            let (reader, size) = self.open_blob(&thumb.hash).await?;
            return Ok(MediaFile { reader, size, content_type: Some(thumb.content_type), filename: None });
        }
        if original.size > thumbnail::MAX_SOURCE_BYTES {
            return Err(ServiceError::TooLarge {
                what: "media to thumbnail",
                limit: usize::try_from(thumbnail::MAX_SOURCE_BYTES).unwrap_or(usize::MAX),
            });
        }
        let hash = original.hash.clone().ok_or_else(|| ServiceError::Internal("media without bytes".into()))?;
        let (mut reader, _) = self.open_blob(&hash).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(original.size).unwrap_or(0));
        (&mut reader)
            .take(thumbnail::MAX_SOURCE_BYTES)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ServiceError::Internal(format!("reading media to thumbnail: {e}")))?;
        let made = tokio::task::spawn_blocking(move || thumbnail::make(&bytes, size.0, size.1, size.2, animated))
            .await
            .map_err(|e| ServiceError::Internal(format!("thumbnail task: {e}")))?;
        let record = match made {
            Err(thumbnail::ThumbnailError::NotAnImage) => {
                return Err(ServiceError::BadRequest("this media cannot be thumbnailed".into()));
            }
            Err(thumbnail::ThumbnailError::TooLarge) => {
                return Err(ServiceError::TooLarge {
                    what: "the image to thumbnail",
                    limit: usize::try_from(thumbnail::MAX_DECODE_ALLOC).unwrap_or(usize::MAX),
                });
            }
            // The original fits the box: it is its own thumbnail, with the type its bytes have.
            Ok(thumbnail::Made::Original { content_type }) => {
                let record = ThumbnailRecord {
                    hash: hash.clone(),
                    size: original.size,
                    content_type: content_type.to_owned(),
                    width: size.0,
                    height: size.1,
                };
                let _blobs = self.blob_lock.lock().await;
                self.name_thumbnail(&key, &record).await?;
                record
            }
            Ok(thumbnail::Made::Thumbnail(made)) => {
                let mut upload = self.store().await?.writer().await?;
                upload.write(&made.bytes).await?;
                let _blobs = self.blob_lock.lock().await;
                let blob = upload.commit().await?;
                let record = ThumbnailRecord {
                    hash: blob.hash.as_str().to_owned(),
                    size: blob.size,
                    content_type: made.content_type.to_owned(),
                    width: made.width,
                    height: made.height,
                };
                self.name_thumbnail(&key, &record).await?;
                record
            }
        };
        let (reader, size) = self.open_blob(&record.hash).await?;
        Ok(MediaFile { reader, size, content_type: Some(record.content_type), filename: None })
    }

    /// Writes a thumbnail row and its blob reference. Callers hold `blob_lock`.
    async fn name_thumbnail(&self, key: &[u8], record: &ThumbnailRecord) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        batch.put(Table::MediaThumbnails, key.to_vec(), encode(record));
        batch.put(Table::MediaBlobRefs, blob_ref(&record.hash, Table::MediaThumbnails, key), Vec::new());
        Ok(self.kv.write(batch).await?)
    }

    /// Deletes media (local or cached remote), its thumbnails, and blobs nothing else names.
    /// Returns whether it existed.
    pub async fn delete(&self, server: &ServerName, media_id: &str) -> Result<bool, ServiceError> {
        let _blobs = self.blob_lock.lock().await;
        self.delete_locked(server, media_id).await
    }

    async fn delete_locked(&self, server: &ServerName, media_id: &str) -> Result<bool, ServiceError> {
        let (table, key) = if server == self.server_name {
            if !serving::valid_media_id(media_id) {
                return Ok(false);
            }
            (Table::Media, media_id.as_bytes().to_vec())
        } else {
            (Table::MediaRemote, remote_key(server, media_id))
        };
        for _ in 0..WRITE_RETRIES {
            let Some((record, raw)) = self.get::<MediaRecord>(table, &key).await? else { return Ok(false) };
            let mut batch = WriteBatch::new();
            batch.expect(table, key.clone(), Some(raw));
            batch.delete(table, key.clone());
            let mut hashes = Vec::new();
            if let Some(hash) = &record.hash {
                batch.delete(Table::MediaBlobRefs, blob_ref(hash, table, &key));
                hashes.push(hash.clone());
            }
            let prefix = thumbnail_prefix(server, media_id);
            let thumbs =
                self.kv.scan(Table::MediaThumbnails, &KeyRange::prefix(&prefix), Direction::Forward, 100).await?;
            for (thumb_key, raw) in thumbs {
                let thumb: ThumbnailRecord = decode(Table::MediaThumbnails, &raw)?;
                batch.delete(Table::MediaThumbnails, thumb_key.clone());
                batch.delete(Table::MediaBlobRefs, blob_ref(&thumb.hash, Table::MediaThumbnails, &thumb_key));
                hashes.push(thumb.hash);
            }
            if let Ok(user) = <&UserId>::try_from(record.uploader.as_str()) {
                let (mut usage, raw) = self.usage(user).await?;
                usage.bytes = usage.bytes.saturating_sub(record.size);
                usage.pending.remove(media_id);
                batch.expect(Table::MediaUsage, user.as_str().as_bytes().to_vec(), raw);
                batch.put(Table::MediaUsage, user.as_str().as_bytes().to_vec(), encode(&usage));
            }
            match self.kv.write(batch).await {
                Ok(()) => {
                    for hash in hashes {
                        self.collect_blob(&ContentHash::parse(&hash)?).await?;
                    }
                    tracing::info!(%server, media_id, "media deleted");
                    return Ok(true);
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent media writes; try again".into()))
    }

    /// Deletes other servers' media cached before `before_ms`; returns how many.
    pub async fn purge_remote(&self, before_ms: u64) -> Result<usize, ServiceError> {
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::MediaRemote, &KeyRange::all()).await?;
        let mut purged = 0;
        for (key, raw) in rows {
            let record: MediaRecord = decode(Table::MediaRemote, &raw)?;
            if record.created_ms >= before_ms {
                continue;
            }
            let Some(split) = key.iter().position(|&b| b == 0) else { continue };
            let (Ok(server), Ok(media_id)) =
                (std::str::from_utf8(&key[..split]), std::str::from_utf8(&key[split + 1..]))
            else {
                continue;
            };
            let Ok(server) = <&ServerName>::try_from(server) else { continue };
            if self.delete(server, media_id).await? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }
}

#[cfg(test)]
mod tests {
    use lattice_storage::MemoryStore;

    use super::*;

    fn media(dir: &std::path::Path, quota: Option<u64>) -> Media {
        let config = MediaConfig {
            directory: dir.to_path_buf(),
            max_upload_bytes: 100,
            max_user_bytes: quota,
            ..MediaConfig::default()
        };
        let server: ruma::OwnedServerName = "hs.test".try_into().unwrap();
        Media::new(config, Arc::new(MemoryStore::new()), Arc::new(crate::SystemClock), server)
    }

    async fn put(media: &Media, user: &UserId, bytes: &[u8], target: UploadTarget<'_>) -> Result<String, ServiceError> {
        let mut upload = media.begin_upload(Some(user)).await?;
        upload.write(bytes).await?;
        media.finish_upload(upload, Some(user), Some("text/plain".into()), Some("a/b.txt".into()), target).await
    }

    fn blobs(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "tmp")
            .map(|e| std::fs::read_dir(e.path()).unwrap().count())
            .sum()
    }

    #[tokio::test]
    async fn the_same_bytes_share_one_blob_until_the_last_name_goes() {
        let dir = tempfile::tempdir().unwrap();
        let media = media(dir.path(), None);
        let alice = <&UserId>::try_from("@alice:hs.test").unwrap();
        let server = media.server_name().to_owned();
        let a = put(&media, alice, b"same", UploadTarget::New).await.unwrap();
        let b = put(&media, alice, b"same", UploadTarget::New).await.unwrap();
        assert_ne!(a, b);
        assert_eq!(blobs(dir.path()), 1);
        assert_eq!(media.used_bytes(alice).await.unwrap(), 8);
        let mut file = media.open_stored(&server, &a, Duration::ZERO).await.unwrap();
        assert_eq!(file.filename.as_deref(), Some("a_b.txt"));
        let mut text = String::new();
        file.reader.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "same");
        assert!(media.delete(&server, &a).await.unwrap());
        assert_eq!(blobs(dir.path()), 1, "b still names the bytes");
        assert!(media.delete(&server, &b).await.unwrap());
        assert_eq!(blobs(dir.path()), 0);
        assert!(!media.delete(&server, &b).await.unwrap());
        assert_eq!(media.used_bytes(alice).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn preview_images_are_deleted_after_their_retention_and_other_media_stays() {
        let dir = tempfile::tempdir().unwrap();
        let media = media(dir.path(), None);
        let server = media.server_name().to_owned();
        let alice = <&UserId>::try_from("@alice:hs.test").unwrap();
        let uploaded = put(&media, alice, b"a user's file", UploadTarget::New).await.unwrap();
        let mut upload = media.begin_upload(None).await.unwrap();
        upload.write(b"an og:image").await.unwrap();
        let image = media.finish_upload(upload, None, None, None, UploadTarget::PreviewImage).await.unwrap();
        let created = media.record(&server, &image, Duration::ZERO).await.unwrap().created_ms;
        assert_eq!(media.purge_preview_images(created).await.unwrap(), 0, "not yet past its retention");
        assert!(media.open_stored(&server, &image, Duration::ZERO).await.is_ok());
        assert_eq!(media.purge_preview_images(created + 1).await.unwrap(), 1);
        assert!(media.open_stored(&server, &image, Duration::ZERO).await.is_err());
        assert!(media.open_stored(&server, &uploaded, Duration::ZERO).await.is_ok());
        assert_eq!(blobs(dir.path()), 1, "the image's bytes went");
        assert_eq!(media.purge_preview_images(u64::MAX).await.unwrap(), 0, "its listing went too");
    }

    #[tokio::test]
    async fn limits_quotas_and_reserved_ids() {
        let dir = tempfile::tempdir().unwrap();
        let media = media(dir.path(), Some(150));
        let alice = <&UserId>::try_from("@alice:hs.test").unwrap();
        let bob = <&UserId>::try_from("@bob:hs.test").unwrap();
        let too_big = put(&media, alice, &[0; 101], UploadTarget::New).await.unwrap_err();
        assert!(matches!(too_big, ServiceError::TooLarge { .. }), "{too_big:?}");
        put(&media, alice, &[1; 100], UploadTarget::New).await.unwrap();
        let over_quota = put(&media, alice, &[2; 51], UploadTarget::New).await.unwrap_err();
        assert!(matches!(over_quota, ServiceError::Forbidden(_)), "{over_quota:?}");
        put(&media, alice, &[2; 50], UploadTarget::New).await.unwrap();
        assert_eq!(blobs(dir.path()), 2, "refused uploads leave nothing");

        let (id, _) = media.reserve(bob).await.unwrap();
        assert!(matches!(media.check_reserved(alice, &id).await, Err(ServiceError::Forbidden(_))));
        media.check_reserved(bob, &id).await.unwrap();
        put(&media, bob, b"late", UploadTarget::Reserved(&id)).await.unwrap();
        assert!(matches!(media.check_reserved(bob, &id).await, Err(ServiceError::CannotOverwriteMedia)));
        let again = put(&media, bob, b"again", UploadTarget::Reserved(&id)).await.unwrap_err();
        assert!(matches!(again, ServiceError::CannotOverwriteMedia), "{again:?}");
        assert!(matches!(media.check_reserved(bob, "nope").await, Err(ServiceError::NotFound(_))));
    }

    #[tokio::test]
    async fn cached_remote_media_is_purged_by_age_with_its_thumbnails() {
        let dir = tempfile::tempdir().unwrap();
        let media = media(dir.path(), None);
        let remote = <&ServerName>::try_from("other.test").unwrap();
        let mut upload = media.begin_upload(None).await.unwrap();
        upload.write(b"remote bytes").await.unwrap();
        media.finish_upload(upload, None, None, None, UploadTarget::Remote(remote, "abc")).await.unwrap();
        assert!(media.is_cached(remote, "abc").await.unwrap());
        assert_eq!(media.purge_remote(0).await.unwrap(), 0, "nothing is older than the epoch");
        assert_eq!(media.purge_remote(u64::MAX).await.unwrap(), 1);
        assert!(!media.is_cached(remote, "abc").await.unwrap());
        assert_eq!(blobs(dir.path()), 0);
    }
}
