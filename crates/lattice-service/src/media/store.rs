//! Where media bytes live: content-addressed blobs behind a small trait. The filesystem is the
//! embedded backend: `<dir>/<first two hex digits>/<sha256>`, written first to `<dir>/tmp/`,
//! fsynced, then renamed into place (and the directory fsynced), so a crash never leaves a
//! partial blob under its hash. Leftovers in `tmp/` are removed at start.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::ServiceError;

/// A blob's name: the lowercase hex SHA-256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContentHash(String);

impl ContentHash {
    /// A stored hash; anything but 64 lowercase hex digits is refused (it names a path).
    pub fn parse(hex: &str) -> Result<Self, ServiceError> {
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self(hex.to_owned()))
        } else {
            Err(ServiceError::Internal(format!("not a content hash: {hex:?}")))
        }
    }

    /// The name of bytes whose SHA-256 is `digest`.
    pub fn of_digest(digest: &[u8]) -> Self {
        Self(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A blob written and committed.
#[derive(Clone, Debug)]
pub struct StoredBlob {
    pub hash: ContentHash,
    pub size: u64,
}

/// A blob opened for reading.
pub struct BlobReader {
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    pub size: u64,
}

/// A blob being written. Dropping it without [`BlobWriter::commit`] discards the bytes.
#[async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), ServiceError>;
    fn written(&self) -> u64;
    /// Makes the bytes durable and visible under their hash (deduplicated: an existing blob
    /// with the same hash is kept and the new bytes dropped).
    async fn commit(self: Box<Self>) -> Result<StoredBlob, ServiceError>;
}

/// The store of media bytes.
#[async_trait]
pub trait MediaStore: Send + Sync {
    async fn writer(&self) -> Result<Box<dyn BlobWriter>, ServiceError>;
    /// `None` when no blob has this hash.
    async fn open(&self, hash: &ContentHash) -> Result<Option<BlobReader>, ServiceError>;
    /// Removes the blob; removing a missing one is not an error.
    async fn delete(&self, hash: &ContentHash) -> Result<(), ServiceError>;
    /// Whether the store answers, checked once at start so a misconfigured store stops it.
    async fn check(&self) -> Result<(), ServiceError> {
        Ok(())
    }
}

fn io(context: &str, error: std::io::Error) -> ServiceError {
    ServiceError::Internal(format!("media store: {context}: {error}"))
}

/// A directory of uploads in progress, named randomly; what a crash left there is removed when
/// it is opened.
pub struct TempFiles {
    dir: PathBuf,
}

impl TempFiles {
    pub fn open(dir: &Path) -> Result<Self, ServiceError> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the media directory", e))?;
        let mut removed = 0usize;
        for entry in std::fs::read_dir(dir).map_err(|e| io("listing tmp", e))? {
            let entry = entry.map_err(|e| io("listing tmp", e))?;
            std::fs::remove_file(entry.path()).map_err(|e| io("removing an unfinished upload", e))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "removed unfinished media uploads left from before a restart");
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// A new, empty upload file.
    pub async fn create(&self) -> Result<SpooledUpload, ServiceError> {
        let name: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..24).map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)])).collect()
        };
        let temp = self.dir.join(format!("{name}.part"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(|e| io("creating an upload file", e))?;
        Ok(SpooledUpload { file: Some(file), temp, hasher: Sha256::new(), written: 0 })
    }
}

/// An upload written to a temporary file while its SHA-256 (its future name) is computed, by
/// both backends. Dropped, the file goes, unless it was moved away first.
pub struct SpooledUpload {
    file: Option<tokio::fs::File>,
    temp: PathBuf,
    hasher: Sha256,
    written: u64,
}

impl SpooledUpload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
        let file = self.file.as_mut().ok_or_else(|| ServiceError::Internal("blob writer already closed".into()))?;
        file.write_all(chunk).await.map_err(|e| io("writing an upload", e))?;
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Closes the file (fsynced first with `durable`) and names its bytes.
    pub async fn finish(&mut self, durable: bool) -> Result<ContentHash, ServiceError> {
        let mut file = self.file.take().ok_or_else(|| ServiceError::Internal("blob writer already closed".into()))?;
        file.flush().await.map_err(|e| io("flushing an upload", e))?;
        if durable {
            file.sync_all().await.map_err(|e| io("syncing an upload", e))?;
        }
        Ok(ContentHash::of_digest(&std::mem::take(&mut self.hasher).finalize()))
    }

    pub fn path(&self) -> &Path {
        &self.temp
    }
}

impl Drop for SpooledUpload {
    fn drop(&mut self) {
        // Not committed (or the commit failed before the file was moved): the bytes go.
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Blobs as files under one directory.
pub struct FsMediaStore {
    root: PathBuf,
    temp: TempFiles,
}

impl FsMediaStore {
    /// Opens (creating) the directory and removes unfinished uploads left by a crash.
    pub fn open(root: &Path) -> Result<Self, ServiceError> {
        let temp = TempFiles::open(&root.join("tmp"))?;
        Ok(Self { root: root.to_path_buf(), temp })
    }

    fn path_of(&self, hash: &ContentHash) -> PathBuf {
        self.root.join(&hash.as_str()[..2]).join(hash.as_str())
    }
}

struct FsBlobWriter {
    spool: SpooledUpload,
    root: PathBuf,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl BlobWriter for FsBlobWriter {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), ServiceError> {
        self.spool.write(chunk).await
    }

    fn written(&self) -> u64 {
        self.spool.written()
    }

    async fn commit(mut self: Box<Self>) -> Result<StoredBlob, ServiceError> {
        let hash = self.spool.finish(true).await?;
        let dir = self.root.join(&hash.as_str()[..2]);
        let target = dir.join(hash.as_str());
        let temp = self.spool.path().to_path_buf();
        let size = self.spool.written();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            if target.exists() {
                // The same bytes are stored already.
                return std::fs::remove_file(&temp);
            }
            std::fs::rename(&temp, &target)?;
            sync_dir(&dir)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("media commit task: {e}")))?
        .map_err(|e| io("committing an upload", e))?;
        Ok(StoredBlob { hash, size })
    }
}

#[async_trait]
impl MediaStore for FsMediaStore {
    async fn writer(&self) -> Result<Box<dyn BlobWriter>, ServiceError> {
        Ok(Box::new(FsBlobWriter { spool: self.temp.create().await?, root: self.root.clone() }))
    }

    async fn open(&self, hash: &ContentHash) -> Result<Option<BlobReader>, ServiceError> {
        match tokio::fs::File::open(self.path_of(hash)).await {
            Ok(file) => {
                let size = file.metadata().await.map_err(|e| io("reading a blob's size", e))?.len();
                Ok(Some(BlobReader { reader: Box::pin(file), size }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("opening a blob", e)),
        }
    }

    async fn delete(&self, hash: &ContentHash) -> Result<(), ServiceError> {
        match tokio::fs::remove_file(self.path_of(hash)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("deleting a blob", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn a_blob_is_visible_only_after_commit_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsMediaStore::open(dir.path()).unwrap();
        let mut writer = store.writer().await.unwrap();
        writer.write(b"hello ").await.unwrap();
        writer.write(b"world").await.unwrap();
        let files = |dir: &Path| walk(dir).into_iter().filter(|p| !p.starts_with(dir.join("tmp"))).count();
        assert_eq!(files(dir.path()), 0, "nothing visible before commit");
        let blob = writer.commit().await.unwrap();
        assert_eq!(blob.size, 11);
        assert_eq!(blob.hash.as_str(), "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
        let mut again = store.writer().await.unwrap();
        again.write(b"hello world").await.unwrap();
        assert_eq!(again.commit().await.unwrap().hash, blob.hash);
        assert_eq!(walk(dir.path()).len(), 1, "one file for both uploads, no temp left");
        let mut read = store.open(&blob.hash).await.unwrap().unwrap();
        let mut text = String::new();
        read.reader.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "hello world");
        store.delete(&blob.hash).await.unwrap();
        assert!(store.open(&blob.hash).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_dropped_writer_leaves_nothing_and_leftovers_go_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsMediaStore::open(dir.path()).unwrap();
        let mut writer = store.writer().await.unwrap();
        writer.write(b"partial").await.unwrap();
        drop(writer);
        assert!(walk(dir.path()).is_empty());
        std::fs::write(dir.path().join("tmp").join("crashed.part"), b"x").unwrap();
        FsMediaStore::open(dir.path()).unwrap();
        assert!(walk(dir.path()).is_empty());
    }

    #[test]
    fn only_hex_sha256_names_a_blob() {
        assert!(ContentHash::parse(&"a".repeat(64)).is_ok());
        assert!(ContentHash::parse("../../etc/passwd").is_err());
        assert!(ContentHash::parse(&"A".repeat(64)).is_err());
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
        }
        files
    }
}
