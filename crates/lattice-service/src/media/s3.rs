//! Media bytes in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, Garage, …), for
//! several server machines sharing one store. Objects are named `<prefix><first two hex
//! digits>/<sha256>` as the filesystem backend names files.
//!
//! An upload is spooled to a local temporary file while its hash is computed (the object's name
//! is its hash, known only at the end), then sent: a PUT for small files, a multipart upload for
//! large ones. S3 makes an object visible only when its upload completes, so a crash never leaves
//! a partial blob under its name; an abandoned multipart upload is the bucket's lifecycle rule
//! to clean (docs/media.md).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

use super::store::{BlobReader, BlobWriter, ContentHash, MediaStore, SpooledUpload, StoredBlob, TempFiles};
use crate::ServiceError;

/// Where and how to reach the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// For stores other than AWS: `https://host[:port]` (path-style requests).
    pub endpoint: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Prepended to every object name (e.g. `media/`), so one bucket can hold other things.
    pub prefix: String,
    /// Plain `http://` endpoints; only for a store on the same machine or a private network.
    pub allow_http: bool,
}

fn s3_error(context: &str, error: object_store::Error) -> ServiceError {
    ServiceError::Internal(format!("media store (S3): {context}: {error}"))
}

/// Blobs as objects in one bucket.
pub struct S3MediaStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    spool: TempFiles,
}

impl S3MediaStore {
    /// Connects lazily (no request is made here); `spool` is a local directory for uploads in
    /// progress, emptied of a crash's leftovers now.
    pub fn open(config: &S3Config, spool: &Path) -> Result<Self, ServiceError> {
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|e| s3_error("configuring the bucket", e))?;
        Ok(Self { store: Arc::new(store), prefix: config.prefix.clone(), spool: TempFiles::open(spool)? })
    }

    fn object_of(&self, hash: &ContentHash) -> ObjectPath {
        ObjectPath::from(format!("{}{}/{}", self.prefix, &hash.as_str()[..2], hash.as_str()))
    }
}

struct S3BlobWriter {
    spool: SpooledUpload,
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

#[async_trait]
impl BlobWriter for S3BlobWriter {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
        self.spool.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.spool.written()
    }

    /// The spooled copy needs no fsync: the object store makes the bytes durable, and the
    /// spool is dropped (removed) either way.
    async fn commit(mut self: Box<Self>) -> Result<StoredBlob, ServiceError> {
        let hash = self.spool.finish(false).await?;
        let size = self.spool.written();
        let object = ObjectPath::from(format!("{}{}/{}", self.prefix, &hash.as_str()[..2], hash.as_str()));
        match self.store.head(&object).await {
            // The same bytes are stored already.
            Ok(_) => return Ok(StoredBlob { hash, size }),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(s3_error("looking for an existing blob", e)),
        }
        let mut spooled = tokio::fs::File::open(self.spool.path())
            .await
            .map_err(|e| ServiceError::Internal(format!("reopening a spooled upload: {e}")))?;
        // Small files in one PUT, larger ones as a multipart upload of 10 MiB parts.
        let mut upload = BufWriter::with_capacity(Arc::clone(&self.store), object, 10 << 20);
        let sent = async {
            tokio::io::copy(&mut spooled, &mut upload).await?;
            upload.shutdown().await
        }
        .await;
        if let Err(e) = sent {
            let _ = upload.abort().await;
            return Err(ServiceError::Internal(format!("media store (S3): sending an upload: {e}")));
        }
        Ok(StoredBlob { hash, size })
    }
}

#[async_trait]
impl MediaStore for S3MediaStore {
    async fn writer(&self) -> Result<Box<dyn BlobWriter>, ServiceError> {
        Ok(Box::new(S3BlobWriter {
            spool: self.spool.create().await?,
            store: Arc::clone(&self.store),
            prefix: self.prefix.clone(),
        }))
    }

    async fn open(&self, hash: &ContentHash) -> Result<Option<BlobReader>, ServiceError> {
        match self.store.get(&self.object_of(hash)).await {
            Ok(result) => {
                let size = result.meta.size;
                let stream = result.into_stream().map_err(std::io::Error::other);
                Ok(Some(BlobReader { reader: Box::pin(tokio_util::io::StreamReader::new(stream)), size }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("opening a blob", e)),
        }
    }

    async fn delete(&self, hash: &ContentHash) -> Result<(), ServiceError> {
        match self.store.delete(&self.object_of(hash)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("deleting a blob", e)),
        }
    }

    /// Lists the top of the prefix (a HEAD cannot tell a missing bucket from a missing object:
    /// both are a bodiless 404), so a missing bucket or refused credentials stop the start.
    async fn check(&self) -> Result<(), ServiceError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        match self.store.list_with_delimiter(prefix.as_ref()).await {
            Ok(_) => Ok(()),
            Err(e) => Err(s3_error(&format!("reaching the bucket {}", self.store), e)),
        }
    }
}
