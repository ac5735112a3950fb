//! Random secrets, token hashing and password hashing.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::ServiceError;

/// A fresh bearer secret: 256 random bits, URL-safe, with a prefix that makes leaked tokens
/// easy to recognise in logs and secret scanners.
pub fn new_token(prefix: &str) -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Tokens are stored and looked up only by this hash.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Random string over `[A-Za-z0-9]`, for device IDs, session IDs and registration tokens.
pub fn random_alphanumeric(len: usize) -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(len).map(char::from).collect()
}

/// Uppercase device IDs like other homeservers hand out (`ABCDEFGHIJ`).
pub fn new_device_id() -> String {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    (0..10).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect()
}

/// argon2id with OWASP's recommended floor (19 MiB, 2 passes, 1 lane) unless configured higher.
#[derive(Clone, Debug)]
pub struct PasswordHasher {
    params: Params,
}

impl PasswordHasher {
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, ServiceError> {
        let params = Params::new(memory_kib, iterations, 1, None)
            .map_err(|e| ServiceError::Internal(format!("argon2 parameters: {e}")))?;
        Ok(Self { params })
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// Hashes on a blocking thread: argon2 is deliberately slow and must not stall the runtime.
    pub async fn hash(&self, password: String) -> Result<String, ServiceError> {
        let argon2 = self.argon2();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2::PasswordHasher::hash_password(&argon2, password.as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|e| ServiceError::Internal(format!("hashing password: {e}")))
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
    }

    /// Checks `password` against a stored hash; with no stored hash it still spends the same
    /// time, so response times do not reveal which accounts exist.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, ServiceError> {
        let argon2 = self.argon2();
        tokio::task::spawn_blocking(move || match stored {
            Some(stored) => {
                let parsed = PasswordHash::new(&stored)
                    .map_err(|e| ServiceError::Internal(format!("stored password hash: {e}")))?;
                Ok(argon2.verify_password(password.as_bytes(), &parsed).is_ok())
            }
            None => {
                let salt = SaltString::generate(&mut OsRng);
                let _ = argon2::PasswordHasher::hash_password(&argon2, password.as_bytes(), &salt);
                Ok(false)
            }
        })
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_256_random_bits() {
        let token = new_token("lat");
        let encoded = token.strip_prefix("lat_").unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(encoded).unwrap().len(), 32);
        assert_ne!(new_token("lat"), token);
    }

    #[tokio::test]
    async fn password_hashes_verify_only_the_right_password() {
        let hasher = PasswordHasher::new(1024, 1).unwrap();
        let hash = hasher.hash("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(hasher.verify("correct horse".into(), Some(hash.clone())).await.unwrap());
        assert!(!hasher.verify("wrong".into(), Some(hash)).await.unwrap());
        assert!(!hasher.verify("anything".into(), None).await.unwrap());
    }
}
