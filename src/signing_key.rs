//! The server's ed25519 signing key, generated on first start and kept in the data directory.
//!
//! File format: one line, `ed25519 <version> <unpadded base64 of the PKCS#8 document>`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ruma::signatures::Ed25519KeyPair;

pub struct SigningKey {
    pub key_pair: Ed25519KeyPair,
}

impl SigningKey {
    /// `ed25519:<version>`, the ID other servers will know the key by.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.key_pair.version())
    }

    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.key_pair.public_key())
    }
}

/// Loads the key at `path`, or creates one there if no file exists yet.
pub fn load_or_create(path: &Path) -> anyhow::Result<SigningKey> {
    if !path.exists() {
        create(path)?;
    }
    load(path)
}

fn load(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading signing key {}", path.display()))?;
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [algorithm, version, encoded] = parts.as_slice() else {
        bail!("signing key {} is malformed: expected `ed25519 <version> <key>`", path.display());
    };
    if *algorithm != "ed25519" {
        bail!("signing key {} uses unsupported algorithm {algorithm}", path.display());
    }
    let document =
        STANDARD_NO_PAD.decode(encoded).with_context(|| format!("signing key {} is not base64", path.display()))?;
    let key_pair = Ed25519KeyPair::from_der(&document, (*version).to_owned())
        .map_err(|e| anyhow::anyhow!("signing key {} is invalid: {e}", path.display()))?;
    Ok(SigningKey { key_pair })
}

fn create(path: &Path) -> anyhow::Result<()> {
    let document = Ed25519KeyPair::generate();
    let version = format!("a_{}", STANDARD_NO_PAD.encode(rand::random::<[u8; 3]>())).replace(['+', '/'], "_");
    let line = format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(document.as_slice()));
    // Write then rename, so a crash never leaves a half-written key behind.
    let tmp = path.with_extension("key.tmp");
    let mut file = open_private(&tmp)?;
    file.write_all(line.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("saving signing key {}", path.display()))?;
    sync_parent_directory(path)?;
    tracing::info!(path = %path.display(), "generated a new signing key");
    Ok(())
}

/// The rename is an entry in the directory: until the directory itself is fsynced, a power loss
/// can forget it and leave no key (or the temporary file) behind, though the server already
/// signed with the new key.
#[cfg(unix)]
fn sync_parent_directory(path: &Path) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let directory = std::fs::File::open(parent).with_context(|| format!("opening {}", parent.display()))?;
    directory.sync_all().with_context(|| format!("syncing directory {}", parent.display()))?;
    Ok(())
}

/// Windows cannot open a directory as a file; its renames are journaled by NTFS.
#[cfg(not(unix))]
fn sync_parent_directory(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn open_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let first = load_or_create(&path).unwrap();
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.key_id(), again.key_id());
        assert_eq!(first.public_key_base64(), again.public_key_base64());
        assert!(first.key_id().starts_with("ed25519:a_"));
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        std::fs::write(&path, "ed25519 a_1 !!!\n").unwrap();
        assert!(load_or_create(&path).is_err());
    }
}
