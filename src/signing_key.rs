//! The server's ed25519 signing key, generated on first start and kept in the data directory.
//!
//! File format: one line, `ed25519 <version> <unpadded base64 of the PKCS#8 document>`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use lattice_federation::OldVerifyKey;
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
    create_avoiding(path, &[])
}

/// Writes a new key at `path` whose version is none of `taken`.
fn create_avoiding(path: &Path, taken: &[String]) -> anyhow::Result<()> {
    let document = Ed25519KeyPair::generate();
    let version = loop {
        let version = format!("a_{}", STANDARD_NO_PAD.encode(rand::random::<[u8; 3]>())).replace(['+', '/'], "_");
        if !taken.iter().any(|id| id.strip_prefix("ed25519:") == Some(version.as_str())) {
            break version;
        }
    };
    let line = format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(document.as_slice()));
    write_durably(path, line.as_bytes(), true).with_context(|| format!("saving signing key {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a new signing key");
    Ok(())
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one,
/// never a torn one, and the new one survives a power loss once this returns: write a
/// temporary file, fsync it, rename it over `path`, fsync the directory. `private` files are
/// readable by the owner only.
pub fn write_durably(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut file = if private {
        open_private(&tmp)?
    } else {
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?
    };
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_parent_directory(path)
}

/// The keys this server signed with before, from `path` (absent: none). One line each:
/// `ed25519:<version> <unpadded base64 public key> <expired_ts in ms>`.
pub fn load_old_keys(path: &Path) -> anyhow::Result<Vec<OldVerifyKey>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading old signing keys {}", path.display())),
    };
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let malformed = || {
            anyhow::anyhow!("{} line {}: expected `ed25519:<version> <key> <expired_ts>`", path.display(), number + 1)
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [key_id, public_key, expired_ts] = parts.as_slice() else { return Err(malformed()) };
        if !key_id.starts_with("ed25519:") || STANDARD_NO_PAD.decode(public_key).map(|k| k.len()) != Ok(32) {
            return Err(malformed());
        }
        let expired_ts = expired_ts.parse().map_err(|_| malformed())?;
        keys.push(OldVerifyKey { key_id: (*key_id).to_owned(), public_key: (*public_key).to_owned(), expired_ts });
    }
    Ok(keys)
}

/// Rotates the signing key: the current key joins the old keys (expired now), then a new key
/// replaces it. Each file is replaced durably; a crash between the two leaves the current key
/// also listed as old, which loading ignores (see `OwnKeys::new`), so the rotation can simply
/// be run again. Returns the new key's ID and the old key's ID.
pub fn rotate(key_path: &Path, old_keys_path: &Path, now_ms: u64) -> anyhow::Result<(String, String)> {
    let current = load(key_path)?;
    let mut old = load_old_keys(old_keys_path)?;
    old.retain(|key| key.key_id != current.key_id());
    old.push(OldVerifyKey { key_id: current.key_id(), public_key: current.public_key_base64(), expired_ts: now_ms });
    if old.len() > lattice_federation::own_keys::MAX_OLD_VERIFY_KEYS {
        bail!(
            "{} already lists {} old keys; remove the oldest lines first",
            old_keys_path.display(),
            lattice_federation::own_keys::MAX_OLD_VERIFY_KEYS
        );
    }
    let text: String =
        old.iter().map(|key| format!("{} {} {}\n", key.key_id, key.public_key, key.expired_ts)).collect();
    write_durably(old_keys_path, text.as_bytes(), false)?;
    let taken: Vec<String> = old.iter().map(|key| key.key_id.clone()).collect();
    create_avoiding(key_path, &taken)?;
    Ok((load(key_path)?.key_id(), current.key_id()))
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
    fn rotation_keeps_the_old_key_listed_with_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let old_path = dir.path().join("old_signing_keys");
        let first = load_or_create(&path).unwrap();
        let (new_id, old_id) = rotate(&path, &old_path, 1_000).unwrap();
        assert_eq!(old_id, first.key_id());
        assert_ne!(new_id, old_id);
        assert_eq!(load_or_create(&path).unwrap().key_id(), new_id);
        let old = load_old_keys(&old_path).unwrap();
        assert_eq!(
            old,
            [OldVerifyKey { key_id: old_id.clone(), public_key: first.public_key_base64(), expired_ts: 1_000 }]
        );
        let (third, second) = rotate(&path, &old_path, 2_000).unwrap();
        assert_eq!(second, new_id);
        let ids: Vec<String> = load_old_keys(&old_path).unwrap().into_iter().map(|k| k.key_id).collect();
        assert_eq!(ids, [old_id, second]);
        assert!(!ids.contains(&third));
        assert!(!dir.path().join("signing.key.tmp").exists());
    }

    #[test]
    fn a_malformed_old_keys_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old_signing_keys");
        std::fs::write(&path, "ed25519:a notbase64 12\n").unwrap();
        assert!(load_old_keys(&path).is_err());
        assert!(load_old_keys(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        std::fs::write(&path, "ed25519 a_1 !!!\n").unwrap();
        assert!(load_or_create(&path).is_err());
    }
}
